"""Progress of the long phases: the calls the phases make, the bars on a terminal and the plain lines elsewhere,
and `make run` itself under a pty and piped to a file."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dapo_ops.common import progress

CONTROL = re.compile(r"\r|\x1b\[")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, int]] = []

    def update(self, state: progress.PhaseProgress, delta: int) -> None:
        self.events.append(("update", state.phase, state.done, state.total))

    def end(self, state: progress.PhaseProgress) -> None:
        self.events.append(("end", state.phase, state.done, state.total))

    def write(self, line: str) -> None:
        self.events.append(("write", line, 0, 0))


@pytest.fixture()
def recorder():
    recorder = Recorder()
    progress.set_progress(recorder)
    yield recorder
    progress.set_progress(None)


def test_without_a_renderer_the_calls_do_nothing():
    progress.set_progress(None)
    progress.begin("generation", 10, unit="tok")
    progress.advance("generation", torch.tensor(3))
    assert progress._open == {}


def test_a_phase_ends_at_its_total_and_an_open_one_when_the_next_begins(recorder: Recorder):
    progress.begin("teacher-forced", 2, unit="batch")
    progress.advance("teacher-forced")
    progress.advance("teacher-forced")
    progress.begin("generation", 100, unit="tok")
    progress.advance("generation", torch.tensor(7))  # a tensor count, as the decoding loop passes it
    progress.begin("optimizer", 2, unit="step")
    assert recorder.events == [
        ("update", "teacher-forced", 0, 2), ("update", "teacher-forced", 1, 2), ("update", "teacher-forced", 2, 2),
        ("end", "teacher-forced", 2, 2),
        ("update", "generation", 0, 100), ("update", "generation", 7, 100), ("end", "generation", 7, 100),
        ("update", "optimizer", 0, 2),
    ]


def test_plain_lines_say_rate_and_eta_every_interval_and_a_line_at_the_end():
    now = [0.0]
    lines: list[str] = []
    plain = progress.PlainLines(lines.append, interval_s=10.0, clock=lambda: now[0])
    state = progress.PhaseProgress("generation", 400, "tok", started=0.0, updated=0.0)
    plain.update(state, 0)
    for t in (5.0, 20.0):
        now[0] = state.updated = t
        state.done += 100
        plain.update(state, 100)
    plain.end(state)
    assert lines == ["generation: 200/400 tok (50%), 10.0 tok/s, ETA 0:20", "generation: 200 tok in 0:20, 10.0 tok/s"]


def test_bars_show_rate_and_a_stopped_early_phase_as_complete():
    out = io.StringIO()
    bars = progress.TqdmBars(out)
    state = progress.PhaseProgress("generation", 64, "tok")
    bars.update(state, 0)
    state.done = 16
    bars.update(state, 16)
    bars.end(state)
    text = out.getvalue()
    assert "\r" in text and "tok/s" in text and "16/16" in text


def test_the_console_renderer_draws_bars_only_on_a_terminal(tmp_path: Path):
    with open(tmp_path / "log.txt", "w") as piped:
        assert isinstance(progress.console_renderer(piped), progress.PlainLines)
    primary, secondary = pty.openpty()
    try:
        with os.fdopen(secondary, "w", closefd=False) as terminal:
            assert isinstance(progress.console_renderer(terminal), progress.TqdmBars)
    finally:
        os.close(primary)
        os.close(secondary)


# ---------------------------------------------------------------------------------------- make run

TINY_RUN = {"prompts_per_round": 4, "num_generations": 2, "max_completion_length": 8, "steps_per_generation": 2,
            "num_iterations": 1, "num_train_examples": 32, "num_eval_examples": 8, "eval_subset_size": 4,
            "warmup_steps": 2}


def make_run(root: Path, run_name: str, **streams) -> subprocess.Popen:
    """`make run ROUNDS=1` of a tiny config in a data root of its own."""
    command = [sys.executable, "-m", "pipelines.cli", "run", "--rounds", "1", "--run-name", run_name,
               *(arg for name, value in TINY_RUN.items() for arg in ("--set", f"{name}={value}"))]
    env = {**os.environ, "DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(command, env=env, **streams)


def _read_terminal(primary: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """The same `make run` under a pty and piped to files, side by side (one thread each, two cores):
    {"terminal": (rc, output, ""), "piped": (rc, stdout, stderr)}."""
    terminal_root, piped_root = tmp_path_factory.mktemp("in-a-pty"), tmp_path_factory.mktemp("piped")
    log, errors = piped_root / "make-run.log", piped_root / "make-run.err"
    primary, secondary = pty.openpty()
    in_pty = make_run(terminal_root, "in-a-pty", stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
    os.close(secondary)
    # `make run > log 2> err`: neither stream may get a control code, MLflow's warnings on stderr included.
    with open(log, "wb") as out, open(errors, "wb") as err:
        piped = make_run(piped_root, "piped", stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        text = _read_terminal(primary).decode(errors="replace")  # until the pty child closes it
        terminal_rc, piped_rc = in_pty.wait(timeout=600), piped.wait(timeout=600)
    return {"terminal": (terminal_rc, text, ""), "piped": (piped_rc, log.read_text(), errors.read_text())}


@pytest.mark.slow
def test_make_run_in_a_terminal_shows_progress_bars(two_runs):
    rc, text, _ = two_runs["terminal"]
    assert rc == 0, text[-3000:]
    for phase, unit in (("generation", "tok"), ("teacher-forced", "batch"), ("optimizer", "step")):
        assert re.search(rf"{phase}: .*\d+/\d+ .*{unit}/s", text), phase
    assert "\r" in text
    assert "[round 1/1] done in" in text


@pytest.mark.slow
def test_make_run_piped_to_a_file_prints_plain_lines(two_runs):
    rc, text, stderr = two_runs["piped"]
    assert rc == 0, stderr[-3000:]
    assert not CONTROL.search(text), CONTROL.search(text)
    assert not CONTROL.search(stderr), stderr[max(0, CONTROL.search(stderr).start() - 300):][:600]
    assert re.search(r"^generation: \d+ tok in \d+:\d\d, [\d.]+ tok/s$", text, re.MULTILINE)
    assert re.search(r"^optimizer: 2 step in \d+:\d\d, [\d.]+ step/s$", text, re.MULTILINE)
    assert re.search(r"^teacher-forced: \d+ batch in ", text, re.MULTILINE)
    assert text.count("config of piped:") == 1
    assert text.count("[round 1/1] done in") == 1
