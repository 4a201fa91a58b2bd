"""Progress of a round's long phases (generation tokens, teacher-forced batches, optimizer steps).

The phases call `begin(phase, total, unit)` once and `advance(phase, n)` as they go; whoever shows progress
(`make run`) sets a renderer with `set_progress`. Without one both calls return at once, so the library,
the tests and Dagster's own runs pay nothing. A phase ends when it reaches its total, when another phase
begins (generation stops early at EOS, below its upper bound) or at `finish_all`.

Two renderers: `LiveLine` (one status line per round on a terminal, redrawn in place: phase, rate, ETA) and
`PlainLines` (a line per phase when it ends and every `interval_s` while it runs, without control codes: CI
logs, pipes; `make run --verbose` only).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO


@dataclass
class PhaseProgress:
    """Where one phase stands: `done` of `total` (an upper bound for generation) `unit`s."""

    phase: str
    total: int
    unit: str
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    updated: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        """Time from `begin` to the last `advance` (not to the next phase's start)."""
        return self.updated - self.started

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


class Renderer(Protocol):
    def update(self, state: PhaseProgress, delta: int) -> None: ...

    def end(self, state: PhaseProgress) -> None: ...

    def write(self, line: str) -> None: ...


_renderer: Renderer | None = None
_open: dict[str, PhaseProgress] = {}


def set_progress(renderer: Renderer | None) -> None:
    """Show progress with `renderer` from now on (None: stop; open phases end first, and the previous
    renderer's `close()`, when it has one, clears what it drew)."""
    global _renderer
    finish_all()
    close = getattr(_renderer, "close", None)
    if close is not None:
        close()
    _renderer = renderer


def begin(phase: str, total: int, unit: str = "it") -> None:
    """Start `phase` with `total` units to do; any other open phase ends."""
    if _renderer is None:
        return
    finish_all()
    _open[phase] = state = PhaseProgress(phase, max(int(total), 0), unit)
    _renderer.update(state, 0)


def advance(phase: str, n: Any = 1) -> None:
    """`n` more units of `phase` done (a number or a 0-d tensor; converted only while progress is shown)."""
    state = _open.get(phase) if _renderer is not None else None
    if state is None:
        return
    delta = int(n)
    state.done += delta
    state.updated = time.monotonic()
    _renderer.update(state, delta)
    if state.total and state.done >= state.total:
        _end(phase)


def finish_all() -> None:
    """End every open phase (a round's summary line follows)."""
    for phase in list(_open):
        _end(phase)


def _end(phase: str) -> None:
    state = _open.pop(phase)
    if _renderer is not None:
        _renderer.end(state)


def echo(line: str) -> None:
    """Print a line to the console without breaking the status line (through the renderer while one is set)."""
    if _renderer is None:
        print(line, flush=True)
    else:
        _renderer.write(line)


# ------------------------------------------------------------------------------------------ renderers


def _seconds(value: float) -> str:
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes}:{seconds:02d}"


class PlainLines:
    """One line when a phase ends (`generation: 384 tok in 0:02, 183.2 tok/s`) and one every `interval_s`
    while it runs, with percentage and ETA. No carriage returns or escape codes."""

    def __init__(self, emit: Callable[[str], None], interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.emit = emit
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}

    def update(self, state: PhaseProgress, delta: int) -> None:
        now = self.clock()
        last = self._last.setdefault(state.phase, now)
        if delta == 0 or now - last < self.interval_s:
            return
        self._last[state.phase] = now
        line = f"{state.phase}: {state.done}/{state.total} {state.unit}"
        if state.total:
            line += f" ({100 * state.done / state.total:.0f}%)"
        line += f", {state.rate:.1f} {state.unit}/s"
        if state.total and state.rate > 0:
            line += f", ETA {_seconds((state.total - state.done) / state.rate)}"
        self.emit(line)

    def end(self, state: PhaseProgress) -> None:
        self._last.pop(state.phase, None)
        self.emit(_phase_line(state))

    def write(self, line: str) -> None:
        self.emit(line)


class LiveLine:
    """One status line on a terminal for one round, redrawn in place: the label, the phase, its count, rate
    and ETA (`[round 2/5] ckpt-0001  generation 48/64 tok  1216 tok/s  ETA 0:01`; the ETA is the round's when
    `expected_s`, the previous round's duration, is known, else the phase's). Lines written meanwhile go above
    it; with `phase_lines` each phase's timing line too. `close()` clears it for the round's summary line."""

    def __init__(self, file: TextIO, label: str, *, expected_s: float | None = None, phase_lines: bool = False,
                 clock: Callable[[], float] = time.monotonic, min_interval_s: float = 0.1) -> None:
        self.file, self.label, self.expected_s, self.phase_lines = file, label, expected_s, phase_lines
        self.clock, self.min_interval_s = clock, min_interval_s
        self.started = clock()
        self._status = ""
        self._drawn = -float("inf")

    def status(self, state: PhaseProgress) -> str:
        line = f"{self.label}  {state.phase} {state.done}"
        line += f"/{state.total} {state.unit}" if state.total else f" {state.unit}"
        if state.rate > 0:
            line += f"  {state.rate:.1f} {state.unit}/s"
        if self.expected_s is not None:
            line += f"  ETA {_seconds(max(self.expected_s - (self.clock() - self.started), 0.0))}"
        elif state.total and state.rate > 0:
            line += f"  ETA {_seconds((state.total - state.done) / state.rate)}"
        return line

    def update(self, state: PhaseProgress, delta: int) -> None:
        now = self.clock()
        if delta and now - self._drawn < self.min_interval_s:
            return
        self._drawn = now
        self._draw(self.status(state))

    def end(self, state: PhaseProgress) -> None:
        self._draw(self.status(state))  # its final count and rate, however short the phase was
        if self.phase_lines:
            self.write(_phase_line(state))

    def write(self, line: str) -> None:
        self.file.write(f"{CLEAR_LINE}{line}\n")
        self._draw(self._status)

    def close(self) -> None:
        """Clear the status line (the cursor stays at the start of that empty line)."""
        if self._status:
            self.file.write(CLEAR_LINE)
            self.file.flush()
        self._status = ""

    def _draw(self, status: str) -> None:
        width = _terminal_width(self.file)
        self._status = status[: max(width - 1, 1)]  # a wrapped line could not be redrawn in place
        self.file.write(f"{CLEAR_LINE}{self._status}")
        self.file.flush()


CLEAR_LINE = "\r\x1b[K"  # to the line's start, erase to its end


def _terminal_width(file: TextIO) -> int:
    try:
        return os.get_terminal_size(file.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 80


def _phase_line(state: PhaseProgress) -> str:
    return f"{state.phase}: {state.done} {state.unit} in {_seconds(state.seconds)}, {state.rate:.1f} {state.unit}/s"


def console_renderer(file: TextIO | None = None, *, label: str = "", verbose: bool = False,
                     expected_s: float | None = None, interval_s: float = 10.0) -> Renderer | None:
    """What `make run` shows of a round on `file` (default stdout): on a terminal a `LiveLine` (with each
    phase's timing line too when `verbose`); piped, no progress display: `PlainLines` when `verbose`, else
    None (nothing)."""
    file = file or sys.stdout
    if file.isatty():
        return LiveLine(file, label, expected_s=expected_s, phase_lines=verbose)
    if not verbose:
        return None

    def emit(line: str) -> None:
        print(line, file=file, flush=True)

    return PlainLines(emit, interval_s=interval_s)
