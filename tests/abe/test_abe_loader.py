"""Tests for load_backend() and available_backends(), the entry-point provider lookup."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from abe.backends.message_queue import loader
from abe.backends.message_queue.loader import (
    BACKEND_ENTRY_POINT_GROUP,
    SERVICE_ENTRY_POINT_GROUP,
    available_backends,
    load_backend,
)
from abe.backends.message_queue.service.memory import MemoryBackend

# MemoryBackend.from_env()'s own warning, in its current and its published wording.
MEMORY_WARNING = r"development( and |/)testing only"

PRIMARY = BACKEND_ENTRY_POINT_GROUP
SERVICE = SERVICE_ENTRY_POINT_GROUP


class RedisLikeBackend:
    """A stand-in provider."""

    @classmethod
    def from_env(cls) -> RedisLikeBackend:
        return cls()


class KafkaLikeBackend(RedisLikeBackend):
    """Another stand-in provider."""


class ShadowedBackend(RedisLikeBackend):
    """A provider that a primary-group registration of the same name must hide."""


class NoFromEnvBackend:
    """A registered class that lacks from_env()."""


def loaded_class() -> type[object]:
    """The class of the backend load_backend() returns (the stand-ins are not full backends)."""
    backend: object = load_backend()
    return type(backend)


@dataclass
class FakeEntryPoint:
    """The part of importlib.metadata.EntryPoint the loader uses."""

    name: str
    target: Any
    value: str = "fake.module:Backend"

    def load(self) -> Any:
        return self.target


MEMORY_EP = FakeEntryPoint(
    "memory", MemoryBackend, "abe.backends.message_queue.service.memory:MemoryBackend"
)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Replace the installed entry points with a per-test registry of both groups."""
    groups: dict[str, list[Any]] = {PRIMARY: [], SERVICE: []}

    def fake_entry_points(*, group: str) -> list[Any]:
        return list(groups.get(group, []))

    monkeypatch.setattr(loader, "entry_points", fake_entry_points)
    return groups


async def test_queue_backend_picks_a_primary_group_provider_by_name(
    registry: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """QUEUE_BACKEND selects the named provider from the abe.backends.message_queue group."""
    registry[PRIMARY] += [
        MEMORY_EP,
        FakeEntryPoint("redis", RedisLikeBackend),
        FakeEntryPoint("kafka", KafkaLikeBackend),
    ]
    monkeypatch.setenv("QUEUE_BACKEND", "kafka")
    assert loaded_class() is KafkaLikeBackend


async def test_queue_backend_picks_a_service_group_provider_by_name(
    registry: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """QUEUE_BACKEND selects the named provider from the .service group too."""
    registry[PRIMARY].append(FakeEntryPoint("redis", RedisLikeBackend))
    registry[SERVICE].append(FakeEntryPoint("kafka", KafkaLikeBackend))
    monkeypatch.setenv("QUEUE_BACKEND", "kafka")
    assert loaded_class() is KafkaLikeBackend


async def test_queue_backend_ignores_surrounding_whitespace(
    registry: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QUEUE_BACKEND value padded with whitespace still names the provider."""
    registry[SERVICE].append(FakeEntryPoint("kafka", KafkaLikeBackend))
    registry[SERVICE].append(FakeEntryPoint("redis", RedisLikeBackend))
    monkeypatch.setenv("QUEUE_BACKEND", "  redis\n")
    assert loaded_class() is RedisLikeBackend


async def test_queue_backend_memory_works_without_any_entry_point(
    registry: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """QUEUE_BACKEND=memory gives a MemoryBackend (with its UserWarning) even if unregistered."""
    registry[SERVICE].append(FakeEntryPoint("redis", RedisLikeBackend))
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    with pytest.warns(UserWarning, match=MEMORY_WARNING):
        backend = load_backend()
    assert type(backend) is MemoryBackend


async def test_unknown_queue_backend_names_installed_providers_and_the_install_command(
    registry: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown QUEUE_BACKEND raises RuntimeError listing the providers and `pip install`."""
    registry[PRIMARY] += [MEMORY_EP, FakeEntryPoint("redis", RedisLikeBackend)]
    registry[SERVICE].append(FakeEntryPoint("kafka", KafkaLikeBackend))
    monkeypatch.setenv("QUEUE_BACKEND", "rabbitmq")
    with pytest.raises(RuntimeError) as excinfo:
        load_backend()
    message = str(excinfo.value)
    assert "'rabbitmq'" in message
    assert "Installed providers: kafka, memory, redis." in message
    assert "pip install abe-rabbitmq" in message


async def test_unknown_queue_backend_lists_memory_even_when_nothing_is_registered(
    registry: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no providers registered the error still names memory as installed."""
    monkeypatch.setenv("QUEUE_BACKEND", "nats")
    with pytest.raises(RuntimeError) as excinfo:
        load_backend()
    assert "pip install abe-nats" in str(excinfo.value)
    assert str(excinfo.value).endswith(
        "Installed providers: memory. Unset QUEUE_BACKEND to auto-select."
    )


async def test_without_queue_backend_the_first_non_memory_provider_wins(
    registry: dict[str, list[Any]],
) -> None:
    """Unset QUEUE_BACKEND auto-selects the first registered provider that is not memory."""
    registry[PRIMARY] += [MEMORY_EP, FakeEntryPoint("redis", RedisLikeBackend)]
    registry[SERVICE].append(FakeEntryPoint("kafka", KafkaLikeBackend))
    assert loaded_class() is RedisLikeBackend


async def test_without_queue_backend_a_service_group_provider_is_auto_selected(
    registry: dict[str, list[Any]],
) -> None:
    """A provider registered only under the .service group is auto-selected over memory."""
    registry[PRIMARY].append(MEMORY_EP)
    registry[SERVICE].append(FakeEntryPoint("kafka", KafkaLikeBackend))
    assert loaded_class() is KafkaLikeBackend


async def test_empty_queue_backend_counts_as_unset(
    registry: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blank QUEUE_BACKEND auto-selects instead of looking up an empty name."""
    registry[SERVICE].append(FakeEntryPoint("kafka", KafkaLikeBackend))
    monkeypatch.setenv("QUEUE_BACKEND", "  ")
    assert loaded_class() is KafkaLikeBackend


async def test_only_memory_registered_falls_back_to_memory_with_a_warning(
    registry: dict[str, list[Any]],
) -> None:
    """With only memory registered the loader returns MemoryBackend and warns UserWarning."""
    registry[PRIMARY].append(MEMORY_EP)
    with (
        pytest.warns(UserWarning, match=MEMORY_WARNING),
        pytest.warns(UserWarning, match="No external backend found"),
    ):
        backend = load_backend()
    assert type(backend) is MemoryBackend


async def test_nothing_registered_falls_back_to_memory_with_a_warning(
    registry: dict[str, list[Any]],
) -> None:
    """With no providers at all the loader still returns MemoryBackend, with a UserWarning."""
    with (
        pytest.warns(UserWarning, match=MEMORY_WARNING),
        pytest.warns(UserWarning, match="No message-queue backends registered"),
    ):
        backend = load_backend()
    assert type(backend) is MemoryBackend


async def test_primary_group_wins_on_duplicate_names(
    registry: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When both groups register a name, the abe.backends.message_queue registration is used."""
    registry[SERVICE].append(FakeEntryPoint("redis", ShadowedBackend))
    registry[PRIMARY].append(FakeEntryPoint("redis", RedisLikeBackend))
    assert available_backends()["redis"].load() is RedisLikeBackend
    monkeypatch.setenv("QUEUE_BACKEND", "redis")
    assert loaded_class() is RedisLikeBackend


async def test_provider_that_fails_to_import_raises_a_clear_runtime_error(
    registry: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registered provider whose module cannot be imported gives a RuntimeError naming it."""
    value = "abe_no_such_provider_module:Backend"
    registry[SERVICE].append(EntryPoint(name="broken", value=value, group=SERVICE))
    monkeypatch.setenv("QUEUE_BACKEND", "broken")
    with pytest.raises(RuntimeError) as excinfo:
        load_backend()
    message = str(excinfo.value)
    assert "'broken'" in message
    assert value in message
    assert "failed to import" in message
    assert "ModuleNotFoundError" in message
    assert isinstance(excinfo.value.__cause__, ModuleNotFoundError)


async def test_auto_selected_provider_that_fails_to_import_is_not_silently_skipped(
    registry: dict[str, list[Any]],
) -> None:
    """An auto-selected provider whose import fails raises instead of falling back to memory."""

    class BrokenEntryPoint(FakeEntryPoint):
        def load(self) -> Any:
            raise ImportError("libbroker.so: cannot open shared object file")

    registry[PRIMARY].append(MEMORY_EP)
    registry[SERVICE].append(BrokenEntryPoint("redis", None, "abe_redis:RedisBackend"))
    with pytest.raises(RuntimeError, match=r"'redis' \(abe_redis:RedisBackend\).*libbroker\.so"):
        load_backend()


async def test_provider_without_from_env_raises_a_clear_runtime_error(
    registry: dict[str, list[Any]],
) -> None:
    """A registered class without from_env() gives a RuntimeError naming the provider."""
    registry[SERVICE].append(FakeEntryPoint("odd", NoFromEnvBackend, "odd_mod:NoFromEnv"))
    with pytest.raises(RuntimeError, match=r"'odd' \(odd_mod:NoFromEnv\) has no from_env"):
        load_backend()


async def test_the_project_registers_memory_in_the_primary_group() -> None:
    """The installed project exposes MemoryBackend as the `memory` provider of the primary group."""
    ep = available_backends()["memory"]
    assert ep.group == PRIMARY
    assert ep.load() is MemoryBackend


# -- a real third-party distribution, installed and found through importlib.metadata ----------

PROVIDER_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "abe-{name}"
version = "0.0.1"

[project.entry-points."{group}"]
{name} = "abe_{name}:{cls}"
tinydup = "abe_{name}:{cls}"

[tool.hatch.build.targets.wheel]
only-include = ["abe_{name}.py"]
"""

PROVIDER_MODULE = '''\
"""A tiny message-queue provider registered under {group}."""


class {cls}:
    async def publish(self, key, payload):
        pass

    async def consume(self, *, group=None):
        return
        yield

    @classmethod
    def from_env(cls):
        return cls()
'''

# Registers `memory` exactly as this project does, so an isolated sys.path still has it.
MEMORY_PYPROJECT = f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "abe-tinymemory"
version = "0.0.1"

[project.entry-points."{PRIMARY}"]
memory = "abe.backends.message_queue.service.memory:MemoryBackend"

[tool.hatch.build.targets.wheel]
only-include = ["abe_tinymemory.py"]
"""

# entry-point group -> (provider name, backend class name)
PROVIDERS = {
    SERVICE: ("tinyservice", "TinyServiceBackend"),
    PRIMARY: ("tinyprimary", "TinyPrimaryBackend"),
}


@pytest.fixture(scope="module")
def installed_providers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build one provider distribution per group and pip-install each into its own target dir.

    Each target also gets a distribution registering ``memory`` the way this project does.
    """
    root = tmp_path_factory.mktemp("providers")
    memory_src = root / "src-tinymemory"
    memory_src.mkdir()
    (memory_src / "pyproject.toml").write_text(MEMORY_PYPROJECT)
    (memory_src / "abe_tinymemory.py").write_text("")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    targets: dict[str, Path] = {}
    procs = []
    for group, (name, cls) in PROVIDERS.items():
        src = root / f"src-{name}"
        src.mkdir()
        (src / "pyproject.toml").write_text(
            PROVIDER_PYPROJECT.format(name=name, group=group, cls=cls)
        )
        (src / f"abe_{name}.py").write_text(PROVIDER_MODULE.format(group=group, cls=cls))
        targets[group] = root / f"site-{name}"
        cmd = [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation",
            "--no-deps", "--no-index", "--target", str(targets[group]), str(src), str(memory_src),
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (out + err).decode(errors="replace")
    return targets


def _holds_distributions(entry: str) -> bool:
    path = Path(entry or ".")
    return path.is_dir() and any(path.glob("*.dist-info"))


@contextmanager
def on_sys_path(*dirs: Path, isolated: bool = False) -> Iterator[None]:
    """Make distributions installed in ``dirs`` visible to importlib, then remove every trace.

    With ``isolated`` every other directory holding distributions (site-packages) is hidden, so
    only the distributions in ``dirs`` register providers. ``abe`` is already imported.
    """
    saved = list(sys.path)
    base = [p for p in saved if not _holds_distributions(p)] if isolated else saved
    before = set(sys.modules)
    sys.path[:] = [*base, *(str(d) for d in dirs)]
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved
        for module in set(sys.modules) - before:
            if module.startswith("abe_tiny"):
                del sys.modules[module]
        importlib.invalidate_caches()


@pytest.mark.slow
@pytest.mark.parametrize("group", [SERVICE, PRIMARY], ids=["service-group", "primary-group"])
async def test_installed_distribution_is_loaded_by_name(
    installed_providers: dict[str, Path], monkeypatch: pytest.MonkeyPatch, group: str
) -> None:
    """A pip-installed provider distribution is found through its entry point and instantiated."""
    name, cls = PROVIDERS[group]
    monkeypatch.setenv("QUEUE_BACKEND", name)
    with on_sys_path(installed_providers[group]):
        assert available_backends()[name].group == group
        backend = load_backend()
    assert type(backend).__module__ == f"abe_{name}"
    assert type(backend).__name__ == cls
    assert name not in available_backends()


@pytest.mark.slow
@pytest.mark.parametrize("group", [SERVICE, PRIMARY], ids=["service-group", "primary-group"])
async def test_installed_distribution_is_auto_selected_over_memory(
    installed_providers: dict[str, Path], group: str
) -> None:
    """With QUEUE_BACKEND unset, an installed third-party provider wins over memory, unwarned."""
    name, cls = PROVIDERS[group]
    with on_sys_path(installed_providers[group], isolated=True):
        assert set(available_backends()) == {"memory", name, "tinydup"}
        backend = load_backend()  # filterwarnings=error: a memory fallback warning would fail
    assert type(backend).__module__ == f"abe_{name}"
    assert type(backend).__name__ == cls


@pytest.mark.slow
async def test_installed_memory_only_falls_back_with_a_warning(
    installed_providers: dict[str, Path],
) -> None:
    """With only the memory registration installed, load_backend() warns and returns memory."""
    memory_only = installed_providers[SERVICE].parent / "site-memory-only"
    memory_only.mkdir(exist_ok=True)
    for dist_info in installed_providers[SERVICE].glob("abe_tinymemory-*.dist-info"):
        target = memory_only / dist_info.name
        if not target.exists():
            target.symlink_to(dist_info, target_is_directory=True)
    with on_sys_path(memory_only, isolated=True):
        assert set(available_backends()) == {"memory"}
        with (
            pytest.warns(UserWarning, match=MEMORY_WARNING),
            pytest.warns(UserWarning, match="No external backend found"),
        ):
            backend = load_backend()
    assert type(backend) is MemoryBackend


@pytest.mark.slow
async def test_installed_distributions_primary_group_wins_on_duplicate_names(
    installed_providers: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two installed distributions registering one name resolve to the primary-group one."""
    monkeypatch.setenv("QUEUE_BACKEND", "tinydup")
    # The service-group distribution is first on sys.path: only group precedence picks primary.
    with on_sys_path(installed_providers[SERVICE], installed_providers[PRIMARY]):
        assert available_backends()["tinydup"].group == PRIMARY
        backend = load_backend()
    assert type(backend).__name__ == PROVIDERS[PRIMARY][1]
