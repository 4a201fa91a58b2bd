"""Progress of a round's long phases (generation tokens, teacher-forced batches, optimizer steps).

The phases call `begin(phase, total, unit)` once and `advance(phase, n)` as they go; whoever shows progress
(`make run`) sets a renderer with `set_progress`. Without one both calls return at once, so the library,
the tests and Dagster's own runs pay nothing. A phase ends when it reaches its total, when another phase
begins (generation stops early at EOS, below its upper bound) or at `finish_all`.

Two renderers: `TqdmBars` (a bar per phase with rate and ETA, for a terminal) and `PlainLines` (a line per
phase when it ends and every `interval_s` while it runs, without control codes: CI, logs, pipes).
"""

from __future__ import annotations

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
    """Show progress with `renderer` from now on (None: stop; open phases end first)."""
    global _renderer
    finish_all()
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
    """Print a line to the console without breaking the bars (through the renderer while one is set)."""
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
        self.emit(f"{state.phase}: {state.done} {state.unit} in {_seconds(state.seconds)}, "
                  f"{state.rate:.1f} {state.unit}/s")

    def write(self, line: str) -> None:
        self.emit(line)


class TqdmBars:
    """A tqdm bar per phase on `file` (a terminal): count, rate and ETA; a phase that ends below its total
    (generation stopped at EOS) shows as complete at what it did."""

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file or sys.stdout
        self._bars: dict[str, Any] = {}

    def update(self, state: PhaseProgress, delta: int) -> None:
        bar = self._bars.get(state.phase)
        if bar is None:
            from tqdm import tqdm

            bar = self._bars[state.phase] = tqdm(total=state.total or None, desc=state.phase, unit=state.unit,
                                                 file=self.file, dynamic_ncols=True, leave=True, mininterval=0.2)
        if delta:
            bar.update(delta)

    def end(self, state: PhaseProgress) -> None:
        bar = self._bars.pop(state.phase, None)
        if bar is None:
            return
        if bar.total is not None and bar.n < bar.total:
            bar.total = bar.n
        bar.refresh()
        bar.close()

    def write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=self.file)
        self.file.flush()


def console_renderer(file: TextIO | None = None, *, interval_s: float = 10.0) -> Renderer:
    """Bars when `file` (default stdout) is a terminal, plain lines otherwise."""
    file = file or sys.stdout
    if file.isatty():
        return TqdmBars(file)

    def emit(line: str) -> None:
        print(line, file=file, flush=True)

    return PlainLines(emit, interval_s=interval_s)
