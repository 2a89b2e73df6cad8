"""Bounded tracebacks in envelopes: the standard library's text, minus position markers."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable

import pytest

from resilience.dead_letter._limits import bounded_traceback

_MARKERS = re.compile(r"^\s*[~^]+\s*$")


def caught(raiser: Callable[[], object]) -> BaseException:
    """The exception ``raiser`` raises, with its traceback."""
    try:
        raiser()
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def stdlib(exc: BaseException, frames: int) -> str:
    """What traceback.format_exception prints, without the ^^^ / ~~~ marker lines."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, -frames))
    return "".join(line for line in text.splitlines(True) if not _MARKERS.match(line))


def nested(depth: int) -> None:
    if depth == 0:
        raise ConnectionError("reset by peer")
    nested(depth - 1)  # the same frame repeated: folded after three


def caused() -> None:
    try:
        nested(2)
    except ConnectionError as exc:
        raise RuntimeError("charge failed") from exc


def during() -> None:
    try:
        {"present": 1}["missing"]
    except KeyError:
        raise ValueError("no such order") from None


def context() -> None:
    try:
        [][1]
    except IndexError:
        raise TypeError("while handling")  # noqa: B904


def with_notes() -> None:
    exc = ValueError("with notes")
    exc.add_note("order 7\nsecond line")
    raise exc


def unprintable() -> None:
    class Odd(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    raise Odd()


def empty_message() -> None:
    raise KeyboardInterrupt


def causeless_chain() -> None:
    raise RuntimeError("outer") from ValueError("never raised, no traceback")


@pytest.mark.parametrize(
    "raiser",
    [
        lambda: nested(10),
        caused,
        during,
        context,
        with_notes,
        unprintable,
        empty_message,
        causeless_chain,
    ],
    ids=[
        "recursion",
        "cause",
        "suppressed",
        "context",
        "notes",
        "unprintable",
        "bare",
        "no-traceback",
    ],
)
@pytest.mark.parametrize("frames", [30, 2])
def test_text_matches_the_standard_library(raiser: Callable[[], object], frames: int) -> None:
    """Frames, source lines, folding, chains and notes read as traceback prints them."""
    exc = caught(raiser)
    text, _ = bounded_traceback(exc, frames, 1_000_000)
    assert text == stdlib(exc, frames)


def test_cut_is_reported_for_any_exception_in_the_chain() -> None:
    """A cause deeper than the frame limit flags the traceback as truncated."""
    exc = caught(caused)
    assert bounded_traceback(exc, 30, 1_000_000)[1] is False
    assert bounded_traceback(exc, 2, 1_000_000)[1] is True


def test_exception_groups_fall_back_to_the_standard_library() -> None:
    """Exception groups keep the traceback module's nested layout."""

    def group() -> None:
        raise ExceptionGroup("two failed", [ValueError("a"), KeyError("b")])

    exc = caught(group)
    text, _ = bounded_traceback(exc, 30, 1_000_000)
    assert text == "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, -30))


def test_zero_frames_keeps_only_the_exception_line() -> None:
    """With max_traceback_frames = 0 only the exception line is kept, flagged as cut."""
    assert bounded_traceback(caught(caused), 0, 1000) == ("RuntimeError: charge failed\n", True)


def test_scrub_runs_before_the_byte_cap() -> None:
    """The scrub function sees the whole text, so the byte cut cannot split a secret."""
    exc = caught(lambda: nested(3))
    seen: list[str] = []

    def scrub(text: str) -> str:
        seen.append(text)
        return text.replace("reset by peer", "[REDACTED]")

    text, cut = bounded_traceback(exc, 30, 300, scrub=scrub)
    assert cut
    assert len(seen) == 1
    assert seen[0].startswith("Traceback")
    assert text.rstrip().endswith("ConnectionError: [REDACTED]")
