"""The library is silent until the application configures logging, and logs one way."""

from __future__ import annotations

import ast
import inspect
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

import abe
import resilience
from resilience._log import get_logger
from resilience.clock import FakeClock
from resilience.dead_letter import DeadLetterRouter, MemoryStore
from resilience.delivery import Delivery
from resilience.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).with_name("silence_scenario.py")
LIBRARY = [ROOT / "abe", ROOT / "resilience"]
CLI = ROOT / "resilience" / "cli"


def _run_scenario(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(SCENARIO), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.mark.slow
def test_nothing_is_printed_until_logging_is_configured() -> None:
    """A handler failure, a retry, a breaker opening, a dead letter and a backend warning print
    nothing on stdout or stderr in a fresh interpreter without logging configuration."""
    result = _run_scenario()
    assert result.returncode == 0, result.stderr  # every step of the scenario really happened
    assert result.stdout == ""
    assert result.stderr == ""


@pytest.mark.slow
def test_every_line_appears_once_the_application_configures_logging() -> None:
    """After logging.basicConfig() the same scenario's lines reach the configured handler."""
    result = _run_scenario("configured")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    expected = [
        "ERROR abe.backends.message_queue.consumer Error processing message: "
        "handler failed on purpose",
        "Traceback (most recent call last):",
        "DEBUG abe.backends.message_queue.consumer Consumer shutdown complete",
        "INFO resilience.retry retry_scheduled",
        "WARNING resilience.breaker circuit breaker 'scenario': closed -> open "
        "(consecutive_failures)",
        "WARNING resilience.dead_letter dead_lettered",
    ]
    for line in expected:
        assert line in lines
    assert any(
        line.startswith("WARNING abe.backends.message_queue.service.redis Redis unavailable")
        for line in lines
    )


async def test_package_roots_carry_a_null_handler() -> None:
    """The abe and resilience loggers each have a NullHandler, so the last resort never prints."""
    for package in (abe, resilience):
        handlers = logging.getLogger(package.__name__).handlers
        assert any(isinstance(h, logging.NullHandler) for h in handlers), package.__name__


async def test_dead_letter_lines_go_through_stdlib_even_with_structlog_defaults(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """With structlog at its printing defaults, a dead letter is a stdlib record, not stdout."""
    structlog.reset_defaults()
    clock = FakeClock()
    router = DeadLetterRouter(MemoryStore(), clock=clock)

    async def handler(payload: dict[str, object]) -> None:
        raise ValueError("bad order")

    with caplog.at_level(logging.INFO, logger="resilience.dead_letter"):
        await Pipeline(router).build(handler)(Delivery({}, key="orders", message_id="9"))
    (record,) = [r for r in caplog.records if r.name == "resilience.dead_letter"]
    assert record.getMessage() == "dead_lettered"
    assert record.levelno == logging.WARNING
    assert record.__dict__["message_id"] == "9"
    assert record.__dict__["error_type"] == "ValueError"
    assert capsys.readouterr().out == ""


def _library_files() -> list[Path]:
    return sorted(path for root in LIBRARY for path in root.rglob("*.py"))


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_deprecation(call: ast.Call) -> bool:
    category = call.args[1] if len(call.args) > 1 else None
    for keyword in call.keywords:
        if keyword.arg == "category":
            category = keyword.value
    return (
        _dotted(category) in ("DeprecationWarning", "PendingDeprecationWarning")
        if category
        else False
    )


# Where each kind of output may be produced, relative to the repository root.
_ALLOWED = {
    "print": ("resilience/cli/",),
    "structlog.get_logger": ("resilience/_log.py",),
    "structlog.wrap_logger": ("resilience/_log.py",),
    "structlog.configure": ("resilience/logging.py",),
    "logging.basicConfig": (),
    # The module-level functions log to the root logger and configure it when it has no handler.
    **dict.fromkeys(
        [f"logging.{f}" for f in ("debug", "info", "warning", "error", "exception", "critical")],
        (),
    ),
    "logging.log": (),
    # The published package warns through ``warnings`` here; nothing else does.
    "warnings.warn": (
        "abe/backends/message_queue/loader.py",
        "abe/backends/message_queue/service/memory.py",
    ),
}


async def test_one_logging_path_in_library_code() -> None:
    """Library modules log only through stdlib loggers under the abe/resilience roots: no print,
    no structlog logger outside resilience._log, no warnings beyond the published ones (and
    deprecations, which Python hides by default)."""
    offences: list[str] = []
    for path in _library_files():
        relative = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=relative)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            allowed = _ALLOWED.get(name)
            if name == "warnings.warn" and _is_deprecation(node):
                allowed = None  # hidden by Python's default filters: API deprecations are fine
            if allowed is not None and not relative.startswith(allowed):
                offences.append(f"{relative}:{node.lineno}: {name}()")
            if (
                name == "logging.getLogger"
                and not node.args
                and relative != "resilience/logging.py"
            ):
                offences.append(f"{relative}:{node.lineno}: the root logger")
            generic = relative == "resilience/_log.py"  # get_logger(name) itself
            if name in ("logging.getLogger", "get_logger") and node.args and not generic:
                arg = node.args[0]
                ok = (isinstance(arg, ast.Name) and arg.id in ("__name__", "LOGGER_NAME")) or (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and arg.value.split(".")[0] in ("abe", "resilience")
                )
                if not ok:
                    offences.append(f"{relative}:{node.lineno}: logger {ast.unparse(arg)}")
    assert offences == [], "\n".join(offences)


async def test_the_shared_redis_logger_name_is_under_the_abe_root() -> None:
    """The logger name the Redis backend modules share lives under the abe root."""
    from abe.backends.message_queue.service._redis_common import LOGGER_NAME

    assert LOGGER_NAME.split(".")[0] == "abe"


def _structlog_factory_logger_class() -> type[logging.Logger]:
    """The Logger class structlog's LoggerFactory installs (it sets it process-wide: undone)."""
    previous = logging.getLoggerClass()
    try:
        return type(structlog.stdlib.LoggerFactory()("resilience.tests.factory-probe"))
    finally:
        logging.setLoggerClass(previous)


@pytest.mark.parametrize("factory", [False, True], ids=["stdlib", "structlog-factory"])
async def test_structured_records_point_at_the_line_that_logged(
    caplog: pytest.LogCaptureFixture, factory: bool
) -> None:
    """A structlog event of the library is a stdlib record located at its call site, whether
    the stdlib logger is a plain Logger or the class structlog's LoggerFactory installs."""
    logger_class = _structlog_factory_logger_class() if factory else logging.Logger
    name = f"resilience.tests.location.{logger_class.__name__}"
    logging.getLogger(name).__class__ = logger_class
    log = get_logger(name)
    with caplog.at_level(logging.INFO, logger=name):
        log.info("located", attempt=2)
        line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
    (record,) = [r for r in caplog.records if r.name == name]
    assert (record.pathname, record.lineno, record.funcName) == (
        __file__,
        line,
        "test_structured_records_point_at_the_line_that_logged",
    )
    assert record.__dict__["attempt"] == 2


async def test_a_context_field_named_like_a_record_attribute_does_not_break_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bound context variable called ``name`` is kept as ``name_`` instead of raising."""
    log = get_logger("resilience.tests.clash")
    with (
        caplog.at_level(logging.INFO, logger="resilience.tests.clash"),
        structlog.contextvars.bound_contextvars(name="checkout", message="hi"),
    ):
        log.info("clash")
    (record,) = [r for r in caplog.records if r.name == "resilience.tests.clash"]
    assert record.name == "resilience.tests.clash"
    assert record.getMessage() == "clash"
    assert (record.__dict__["name_"], record.__dict__["message_"]) == ("checkout", "hi")
