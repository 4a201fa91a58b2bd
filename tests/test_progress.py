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


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_live_line_redraws_one_status_line_with_phase_rate_and_eta_and_writes_lines_above_it():
    out, clock = io.StringIO(), Clock()
    line = progress.LiveLine(out, "[round 1/2] ckpt-0000", clock=clock)
    state = progress.PhaseProgress("generation", 64, "tok", started=0.0, updated=0.0)
    line.update(state, 0)
    state.done, state.updated = 16, 2.0
    clock.now += 1.0  # redrawn at most every 0.1 s
    line.update(state, 16)
    line.write("WARNING health check")
    line.close()
    status = "[round 1/2] ckpt-0000  generation 16/64 tok  8.0 tok/s  ETA 0:06"
    assert out.getvalue() == ("\r\x1b[K[round 1/2] ckpt-0000  generation 0/64 tok"
                              f"\r\x1b[K{status}"
                              f"\r\x1b[KWARNING health check\n\r\x1b[K{status}"
                              "\r\x1b[K")


def test_the_live_line_gives_the_round_s_eta_from_the_previous_round_and_fits_the_terminal_width():
    out, clock = io.StringIO(), Clock()
    line = progress.LiveLine(out, "[round 2/2] ckpt-0001", expected_s=30.0, clock=clock)
    clock.now += 12.0
    line.update(progress.PhaseProgress("optimizer", 2, "step", done=1, started=0.0, updated=5.0), 1)
    assert out.getvalue().endswith("optimizer 1/2 step  0.2 step/s  ETA 0:18")
    long = progress.LiveLine(out, "x" * 200, clock=clock)
    long.update(progress.PhaseProgress("generation", 8, "tok"), 0)
    assert out.getvalue().endswith("\r\x1b[K" + "x" * 79)  # no wrapped line (80 columns when unknown)


def test_the_live_line_shows_each_phase_s_final_rate_and_writes_its_timing_only_when_asked():
    for phase_lines in (False, True):
        out = io.StringIO()
        line = progress.LiveLine(out, "[round 1/1] ckpt-0000", phase_lines=phase_lines, clock=Clock())
        line.end(progress.PhaseProgress("optimizer", 2, "step", done=2, started=0.0, updated=0.5))
        assert ("optimizer: 2 step in 0:00, 4.0 step/s\n" in out.getvalue()) is phase_lines
        assert "optimizer 2/2 step  4.0 step/s" in out.getvalue()  # drawn at its end, however short it was


def test_the_console_shows_a_live_line_on_a_terminal_and_no_progress_when_piped_unless_verbose(tmp_path: Path):
    with open(tmp_path / "log.txt", "w") as piped:
        assert progress.console_renderer(piped) is None
        assert isinstance(progress.console_renderer(piped, verbose=True), progress.PlainLines)
    primary, secondary = pty.openpty()
    try:
        with os.fdopen(secondary, "w", closefd=False) as terminal:
            for verbose in (False, True):
                renderer = progress.console_renderer(terminal, label="[round 1/1]", verbose=verbose)
                assert isinstance(renderer, progress.LiveLine) and renderer.phase_lines is verbose
    finally:
        os.close(primary)
        os.close(secondary)


def test_replacing_the_renderer_clears_the_live_line(recorder: Recorder):
    out = io.StringIO()
    progress.set_progress(progress.LiveLine(out, "[round 1/1]", clock=Clock()))
    progress.begin("generation", 8, unit="tok")
    progress.set_progress(recorder)
    assert out.getvalue().endswith("\r\x1b[K")


# ---------------------------------------------------------------------------------------- make run

TINY_RUN = {"prompts_per_round": 4, "num_generations": 2, "max_completion_length": 8, "steps_per_generation": 2,
            "num_iterations": 1, "num_train_examples": 32, "num_eval_examples": 8, "eval_subset_size": 4,
            "warmup_steps": 2}
REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"step \d+: epoch \d+ loss ")  # a round-log line of one optimizer step
PHASE_LINE = re.compile(r"^(generation|teacher-forced|optimizer): \d+ \w+ in \d+:\d\d, [\d.]+ \w+/s\r?$", re.MULTILINE)


def make_run(root: Path, run_name: str, rounds: int, *, verbose: bool = False, dry_run: bool = False,
             **streams) -> subprocess.Popen:
    """`make run ROUNDS=<rounds> RUN_NAME=<run_name> SET="<tiny config>" [VERBOSE=1]` in a data root of its own
    (without `make install`: the test session's environment is installed; `dry_run`: `make -n`)."""
    stamp = ".venv/.installed"
    command = ["make", *(["-n"] if dry_run else []), "--no-print-directory", "-o", stamp, f"STAMP={stamp}", f"BIN={Path(sys.executable).parent}",
               "run", f"ROUNDS={rounds}", f"RUN_NAME={run_name}",
               "SET=" + " ".join(f"{name}={value}" for name, value in TINY_RUN.items()),
               *(["VERBOSE=1"] if verbose else [])]
    env = {**os.environ, "DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL"):  # the run's own defaults, not the session's
        env.pop(name, None)
    return subprocess.Popen(command, cwd=REPO, env=env, **streams)


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


def _side_by_side(terminal_root: Path, piped_root: Path) -> dict[str, tuple[int, str, str]]:
    """`make run ROUNDS=1` under a pty and piped to files, at once (one thread each, two cores)."""
    log, errors = piped_root / "make-run.log", piped_root / "make-run.err"
    primary, secondary = pty.openpty()
    in_pty = make_run(terminal_root, "in-a-pty", 1, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
    os.close(secondary)
    # `make run > log 2> err`: neither stream may get a control code, MLflow's warnings on stderr included.
    with open(log, "wb") as out, open(errors, "wb") as err:
        piped = make_run(piped_root, "piped", 1, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        text = _read_terminal(primary).decode(errors="replace")  # until the pty child closes it
        terminal_rc, piped_rc = in_pty.wait(timeout=600), piped.wait(timeout=600)
    return {"terminal": (terminal_rc, text, ""), "piped": (piped_rc, log.read_text(), errors.read_text())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """Round 1: `make run ROUNDS=1` under a pty and piped, at once. Round 2, resumed in this process with
    --verbose (`run_training(live=True, verbose=True)`), its stdout the pty or a file:
    {"terminal"|"piped"|"terminal verbose"|"piped verbose": (rc, stdout, stderr or "")}, and the data roots
    under "roots"."""
    terminal_root, piped_root = tmp_path_factory.mktemp("in-a-pty"), tmp_path_factory.mktemp("piped")
    results = _side_by_side(terminal_root, piped_root)
    for name, root, in_pty in (("terminal", terminal_root, True), ("piped", piped_root, False)):
        results[f"{name} verbose"] = (0, _verbose_round_2(root, "in-a-pty" if in_pty else "piped", in_pty), "")
    return {**results, "roots": (terminal_root, piped_root)}


def _verbose_round_2(root: Path, run_name: str, in_pty: bool) -> str:
    """What `make run ROUNDS=2 VERBOSE=1` prints on a terminal or into a file (round 2 of the run in `root`)."""
    import contextlib
    import threading

    from dapo_ops.config.dapo import DapoConfig
    from pipelines.cli import run_training
    from tests.conftest import _restore_env, _set_env

    previous = _set_env({"DAPO_VLM_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"),
                         "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"})
    chunks: list[bytes] = []
    primary, secondary = pty.openpty() if in_pty else (None, None)
    out = os.fdopen(secondary, "w") if in_pty else open(root / "verbose.log", "w")  # noqa: SIM115
    reader = threading.Thread(target=lambda: chunks.append(_read_terminal(primary))) if in_pty else None
    try:
        if reader is not None:
            reader.start()
        with out, contextlib.redirect_stdout(out):
            run_training(DapoConfig(run_name=run_name, **TINY_RUN), 2, root=root, live=True, verbose=True)
    finally:
        _restore_env(previous)
    if reader is None:
        return (root / "verbose.log").read_text()
    reader.join(timeout=60)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_make_run_in_a_terminal_shows_one_live_line_per_round_and_its_summary_line(runs):
    rc, text, _ = runs["terminal"]
    assert rc == 0, text[-3000:]
    assert re.search(r"\r\x1b\[K\[round 1/1\] ckpt-0000  generation \d+/\d+ tok  [\d.]+ tok/s  ETA \d+:\d\d", text)
    for phase, unit in (("teacher-forced", "batch"), ("optimizer", "step")):
        assert re.search(rf"\[round 1/1\] ckpt-0000  {phase} \d+/\d+ {unit}", text), phase
    assert text.count("[round 1/1] done in") == 1
    assert not STEP_LINE.search(text) and not PHASE_LINE.search(text) and "config of" not in text


def test_make_run_verbose_1_passes_verbose_to_the_cli(tmp_path: Path):
    for verbose in (False, True):
        shown = make_run(tmp_path, "dry", 2, verbose=verbose, dry_run=True, stdout=subprocess.PIPE, text=True)
        command = shown.communicate(timeout=60)[0].split()
        assert command[1:5] == ["-m", "pipelines.cli", "run", "--set"]
        assert ("--verbose" in command) is verbose


@pytest.mark.slow
def test_make_run_verbose_in_a_terminal_adds_the_step_lines_and_phase_timings(runs):
    rc, text, _ = runs["terminal verbose"]
    assert rc == 0, text[-3000:]
    assert re.search(r"\[round 2/2\] ckpt-0001  generation \d+/\d+ tok", text)
    assert STEP_LINE.search(text) and re.search(r"optimizer: 2 step in \d+:\d\d", text)
    assert text.count("[round 2/2] done in") == 1


@pytest.mark.slow
def test_make_run_piped_prints_one_summary_line_per_round_and_no_control_codes(runs):
    rc, text, stderr = runs["piped"]
    assert rc == 0, stderr[-3000:]
    assert not CONTROL.search(text), CONTROL.search(text)
    assert not CONTROL.search(stderr), stderr[max(0, CONTROL.search(stderr).start() - 300):][:600]
    shown = text[:text.index("\nRun 'piped' finished")].splitlines()[1:]  # after make's echo of the command
    assert len(shown) == 2, shown
    assert shown[0] == "[setup] piped: dataset + ckpt-0000 (embedded)"
    assert shown[1].startswith("[round 1/1] done in")


@pytest.mark.slow
def test_make_run_keeps_mlflow_s_info_lines_and_its_dataset_warning_out_of_the_output(runs):
    """MLflow logs INFO lines on creating a store and around its system-metrics monitor, and warns that a
    dataset path "can be interpreted in multiple ways"; `make run` shows neither (VERBOSE=1 keeps the INFO)."""
    for name in ("piped", "terminal"):
        rc, text, stderr = runs[name]
        assert rc == 0, stderr[-3000:]
        for line in (text + stderr).splitlines():
            assert " INFO mlflow" not in line and "Warning" not in line, (name, line)


@pytest.mark.slow
def test_make_run_verbose_piped_adds_the_step_lines_and_phase_timings_without_control_codes(runs):
    rc, text, stderr = runs["piped verbose"]
    assert rc == 0, stderr[-3000:]
    assert not CONTROL.search(text) and not CONTROL.search(stderr)
    assert re.search(r"^    \[\d\d:\d\d:\d\d\] step 3: epoch 0 loss ", text, re.MULTILINE)
    assert re.search(r"^generation: \d+ tok in \d+:\d\d, [\d.]+ tok/s$", text, re.MULTILINE)
    assert re.search(r"^optimizer: 2 step in \d+:\d\d, [\d.]+ step/s$", text, re.MULTILINE)
    assert re.search(r"^teacher-forced: \d+ batch in ", text, re.MULTILINE)
    assert text.count("config of piped:") == 1
    assert text.count("[round 2/2] done in") == 1


@pytest.mark.slow
def test_run_terminal_md_has_the_step_lines_with_or_without_verbose(runs):
    for root in runs["roots"]:
        for key in ("ckpt-0000", "ckpt-0001"):  # round 1 without --verbose, round 2 with it
            report = next((root / "runs").glob(f"*/reports/{key}/run_terminal.md"))
            assert STEP_LINE.search(report.read_text()), report
