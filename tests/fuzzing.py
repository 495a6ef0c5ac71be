"""What every fuzz suite (tests/test_fuzz_*.py) checks of a parser of user input.

The property, for any input: the parser returns a result, or it raises a
:class:`~vdvae_latents.core.errors.UserError` whose message is one plain, non-empty line (the
CLI prints it and exits 2) and, for a file, names the file. Any other exception is a bug: the
CLI would print a traceback and exit 1. :func:`outcome` lets only ``UserError`` through, so any
other exception fails the test with its traceback.

:func:`allocation_peak` measures the largest allocation a call makes (numpy reports its
buffers to :mod:`tracemalloc`), for "never allocate what a header claims but the file cannot
back". :func:`unique` and :func:`truncated_or_flipped` make the files the suites damage.
"""

from __future__ import annotations

import contextlib
import itertools
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from vdvae_latents.core.errors import UserError

_names = itertools.count()


def outcome(call: Callable[[], Any]) -> Any:
    """``call()``'s result, or the UserError it raised (checked to be one plain line); any other
    exception propagates and fails the test."""
    try:
        return call()
    except UserError as err:
        assert_one_sentence(err)
        return err


def refused(result: Any) -> bool:
    """Whether :func:`outcome` came back with a UserError."""
    return isinstance(result, UserError)


def assert_one_sentence(err: UserError, *, names: str | None = None) -> None:
    """The CLI's contract for a UserError: one non-empty line (naming ``names`` when given)."""
    message = str(err)
    assert message.strip(), f"{type(err).__name__} with an empty message"
    assert len(message.splitlines()) == 1, f"a message of several lines: {message!r}"
    if names is not None:
        assert names in message, f"the message does not name {names!r}: {message!r}"


@contextlib.contextmanager
def allocation_peak() -> Iterator[list[int]]:
    """Yields a list that holds, after the block, the peak bytes traced during it."""
    peak: list[int] = []
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1] - base)
        if not was_tracing:
            tracemalloc.stop()


def unique(folder: Path, suffix: str) -> Path:
    """A new file name in ``folder`` (each hypothesis example writes its own file)."""
    return folder / f"f{next(_names)}{suffix}"


def truncated_or_flipped(data: bytes, draw: Callable[[st.SearchStrategy], Any]) -> bytes:
    """``data`` cut short or with one to eight bytes changed (``draw`` from a composite strategy)."""
    if draw(st.booleans()):
        return data[:draw(st.integers(0, len(data)))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)
