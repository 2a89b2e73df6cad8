"""Every code block of README.md and docs/ runs as written (see docs_blocks for the rules).

Python blocks run as scripts in a fresh directory holding the page's titled files; TOML blocks
load as policies (``pyproject.toml`` blocks only parse); shell and console blocks run in bash
with the project's ``resilience`` command on ``PATH``; JSON blocks parse. Blocks marked with
``<!-- example: skip: WHY -->`` are reported as skipped with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from docs_blocks import PYTHON, SHELL, Block, all_blocks, blocks_of, console_commands

TIMEOUT = 180.0
"""Seconds one block may run (the slowest examples take a few seconds)."""

EXAMPLES = [block for block in all_blocks() if block.language != "text" or block.problem]


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def docs_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free port for the examples that need Redis.

    Private, so the examples can use the plain key names they show (``orders``) without
    touching anything else on a shared Redis.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        if _ci():
            pytest.fail("redis-server is not on PATH; CI=true, so the Redis examples must run")
        pytest.skip("redis-server is not on PATH: the Redis examples need one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = tmp_path_factory.mktemp("docs-redis")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    try:
        for _ in range(500):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None:
                    pytest.fail(f"redis-server exited with {process.returncode}")
                time.sleep(0.02)
        else:
            pytest.fail(f"redis-server on port {port} did not answer")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.kill()
        process.wait(timeout=10)


SHARED_BROKERS = {
    "rabbitmq": ("RABBITMQ_URL", "RABBITMQ_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    "nats": ("NATS_URL", "NATS_TEST_URL", "nats://127.0.0.1:4222"),
}
"""Broker flag: (variable the backend reads, variable the tests read, default URL)."""


def _shared_broker(flag: str) -> dict[str, str]:
    """QUEUE_BACKEND and the URL of the broker the broker tests use; skips when it is down."""
    variable, test_variable, default = SHARED_BROKERS[flag]
    url = os.environ.get(test_variable, default)
    parsed = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), 2).close()
    except OSError as exc:
        reason = f"{flag} at {url} does not answer ({exc}); set {test_variable} or start it"
        if _ci():
            pytest.fail(f"{reason}; CI=true, so the {flag} examples must run")
        pytest.skip(reason)
    return {"QUEUE_BACKEND": flag, variable: url}


def _environment(block: Block, redis_url: str | None) -> dict[str, str]:
    """The process environment of an example: the suite's, without broker or policy settings."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(
            ("QUEUE_", "REDIS_", "RABBITMQ_", "NATS_", "RESILIENCE_", "OTEL_", "PYTEST_")
        )
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    if redis_url is not None:
        env.update(QUEUE_BACKEND="redis", REDIS_URL=redis_url, REDIS_STREAMS="orders")
    for flag in block.flags & SHARED_BROKERS.keys():
        env.update(_shared_broker(flag))
    env.update(block.env)
    return env


def _write_page_files(block: Block, directory: Path) -> None:
    """Write every titled block of the block's page into ``directory``."""
    for other in blocks_of(block.path):
        if other.title:
            target = directory / other.title
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(other.source, encoding="utf-8")


def _run(command: list[str], directory: Path, env: dict[str, str], block: Block) -> str:
    proc = subprocess.run(
        command,
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    output = f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, (
        f"{block.where}: the {block.language} example exited with {proc.returncode}\n"
        f"--- example ---\n{block.source}{output}"
    )
    return proc.stdout


def _check_output(block: Block, stdout: str) -> None:
    """When the next block is marked ``<!-- example: output -->``, it is what ``block`` prints."""
    page = blocks_of(block.path)
    position = next(i for i, other in enumerate(page) if other.line == block.line)
    if position + 1 < len(page) and "output" in page[position + 1].flags:
        shown = page[position + 1]
        assert stdout.strip() == shown.source.strip(), (
            f"{shown.where}: the output shown is not what {block.where} prints\n"
            f"--- shown ---\n{shown.source}--- printed ---\n{stdout}"
        )


@pytest.mark.parametrize("block", EXAMPLES, ids=[b.test_id for b in EXAMPLES])
def test_example_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The code block runs as written (or is skipped with the reason its marker gives)."""
    assert block.problem is None, f"{block.where}: {block.problem}"
    if block.skip is not None:
        pytest.skip(f"{block.where}: {block.skip}")
    redis_url = request.getfixturevalue("docs_redis_url") if "redis" in block.flags else None
    if redis_url is not None:
        client = redis.Redis.from_url(redis_url)
        client.flushall()
        client.close()
    _write_page_files(block, tmp_path)
    env = _environment(block, redis_url)
    if block.language in PYTHON:
        script = tmp_path / (block.title or f"example_{block.line}.py")
        if block.title is None:
            if "pytest" in block.flags:
                script = tmp_path / f"test_example_{block.line}.py"
            script.write_text(block.source, encoding="utf-8")
        if "pytest" in block.flags:
            # A user's project with pytest and pytest-asyncio only: none of the other plugins
            # of this environment (hypothesis, looptime, ...) are loaded.
            env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            command += ["-p", "pytest_asyncio.plugin", script.name]
            out = _run(command, tmp_path, env, block)
            assert " passed" in out, out
        else:
            out = _run([sys.executable, str(script.relative_to(tmp_path))], tmp_path, env, block)
            _check_output(block, out)
    elif block.language in SHELL:
        script_text = (
            console_commands(block.source) if block.language == "console" else block.source
        )
        assert script_text.strip(), f"{block.where}: a console block without `$ ` commands"
        out = _run(["bash", "-e", "-o", "pipefail", "-c", script_text], tmp_path, env, block)
        _check_output(block, out)
    elif block.language == "toml":
        tomllib.loads(block.source)
        if (block.title or "").rsplit("/", 1)[-1] != "pyproject.toml":
            # In a process of its own: the policy imports the page's modules (myapp.errors).
            path = tmp_path / (block.title or "policy.toml")
            path.write_text(block.source, encoding="utf-8")
            load = "import sys; from resilience.policy import Policy; Policy.from_toml(sys.argv[1])"
            _run([sys.executable, "-c", load, str(path)], tmp_path, env, block)
    elif block.language == "json":
        json.loads(block.source)
    elif block.language == "yaml":
        assert isinstance(yaml.safe_load(block.source), dict), f"{block.where}: not a YAML mapping"
    else:  # pragma: no cover - docs_blocks rejects other languages
        pytest.fail(f"{block.where}: no rule for {block.language!r}")


def test_shown_output_must_match(tmp_path: Path) -> None:
    """A text block marked as output fails the example whose printed text differs from it."""
    page = tmp_path / "page.md"
    page.write_text(
        '```python\nprint("one")\n```\n\n<!-- example: output -->\n```text\ntwo\n```\n',
        encoding="utf-8",
    )
    block = blocks_of(page)[0]
    with pytest.raises(AssertionError, match="the output shown is not what"):
        _check_output(block, "one\n")
    page.write_text(page.read_text(encoding="utf-8").replace("two", "one"), encoding="utf-8")
    _check_output(block, "one\n")
