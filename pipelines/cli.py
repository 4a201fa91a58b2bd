"""`python -m pipelines.cli`: what the Makefile targets call.

`run` materializes the asset graph through Dagster, in this process, recorded in the instance at
`DAGSTER_HOME`, so that `make ui` afterwards shows every materialization. It resumes from the newest
complete checkpoint and finishes a round whose reports were interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dapo_ops.config.dapo import EMBEDDED, DapoConfig, data_root
from dapo_ops.run.resume import EvalDropError
from dapo_ops.tracking.facade import Tracker, resolve_tracking_uri
from dapo_ops.tracking.lifecycle import RunInterrupted, sync_runs, system_metrics, tracked_run

DAGSTER_YAML = """\
# Written by dapo-vlm: SQLite storage under DAGSTER_HOME, no telemetry.
telemetry:
  enabled: false
"""

# Tags the Dagster runs `make run` starts with its pid, so a resumed run can tell its own from orphans.
CLI_PID_TAG = "dapo/cli_pid"
DEFAULT_ROUNDS = DapoConfig.field_default("max_rounds")


def prepare_instance(root: Path | None = None) -> Path:
    """Make sure DAGSTER_HOME is set (default <data root>/dagster) and holds a dagster.yaml."""
    root = root or data_root()
    home = Path(os.environ.get("DAGSTER_HOME") or root / "dagster").resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        from dapo_ops.store.layout import write_text_atomic

        write_text_atomic(home / "dagster.yaml", DAGSTER_YAML)  # never a torn file after a crash
    return home


def open_instance(home: Path):
    """The Dagster instance at `home`. Two `make run`s starting on a new DAGSTER_HOME would race through
    the creation of its SQLite tables, so the first touch of each storage happens under a file lock."""
    import fcntl

    import dagster as dg

    with open(home / ".instance-lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("checkpoints")
        instance.schedule_storage  # noqa: B018 - creates schedules.db
    return instance


def _quiet_run_config(run_config):
    import dagster as dg

    config = run_config.to_config_dict() if isinstance(run_config, dg.RunConfig) else dict(run_config)
    if not config.get("loggers"):
        # Dagster's console logger would print every event, and a failed step's stack trace above the
        # one-line message this CLI prints. Progress lines are ours; the events (a failure's trace too)
        # stay in the run's event log and step logs, which the Dagster UI shows.
        config["loggers"] = {"console": {"config": {"log_level": "CRITICAL"}}}
    return config


SETUP_JOB = "setup_run"
ROUND_JOB = "training_round"
REANALYSIS_JOB = "reanalysis"


def materialize(job_name: str, config, *, selection=None, partition_key: str | None = None, instance=None,
                tags=None):
    """Execute the code location's job `job_name` in process (only the assets in `selection` when given: a
    subset of that job's assets, as the UI's "materialize selected" does); raise on failure.

    The run is recorded under the job's name with the job's tags, as one launched from the UI is."""
    import dagster as dg

    from pipelines.config import run_config_for
    from pipelines.definitions import defs

    job = defs.resolve_job_def(job_name)
    keys = None if selection is None else [dg.AssetKey(name) for name in selection]
    result = job.execute_in_process(
        run_config=_quiet_run_config(run_config_for(config)),
        instance=instance,
        partition_key=partition_key,
        asset_selection=keys,
        tags=tags or {},
        raise_on_error=False,
    )
    if not result.success:
        if any(_was_interrupted(event) for event in result.all_events):
            # Dagster turns a SIGINT during a step into a step failure; it is still a kill, not a failed round.
            raise RunInterrupted(signal.SIGINT)
        blocked = _failed_blocking_checks(result.all_events)
        if blocked:
            raise EvalDropError("\n".join(blocked))
        messages = []
        for event in result.all_events:
            if event.is_failure and event.event_specific_data is not None:
                error = getattr(event.event_specific_data, "error", None)
                if error is not None and event.step_key is not None:
                    messages.append(f"{event.step_key}: {_root_cause(error)}")
        raise RuntimeError("Dagster run failed:\n" + "\n".join(messages or ["(see the Dagster UI)"]))
    return result


def _failed_blocking_checks(events) -> list[str]:
    """'<asset>: blocking check <name> failed: <finding>; <remedy>' per failed blocking ERROR check."""
    import dagster as dg

    lines = []
    for event in events:
        if event.event_type != dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            continue
        evaluation = event.event_specific_data
        if evaluation.passed or not evaluation.blocking or evaluation.severity != dg.AssetCheckSeverity.ERROR:
            continue
        metadata = evaluation.metadata
        finding = metadata["finding"].value if "finding" in metadata else "(see the Dagster UI)"
        remedy = f"; {metadata['remedy'].value}" if "remedy" in metadata else ""
        lines.append(f"{evaluation.asset_key.to_user_string()}: blocking check {evaluation.check_name} failed: "
                     f"{finding}{remedy}")
    return lines


def _was_interrupted(event) -> bool:
    error = getattr(event.event_specific_data, "error", None) if event.is_failure else None
    while error is not None:
        if error.cls_name in ("DagsterExecutionInterruptedError", "KeyboardInterrupt", "RunInterrupted"):
            return True
        error = error.cause
    return False


def _root_cause(error) -> str:
    """The innermost error of a Dagster step failure (the user's exception, not Dagster's wrapper)."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _progress(message: str) -> None:
    from dapo_ops.common import progress

    progress.echo(message)  # above the progress bars while they show


def run_training(config: DapoConfig, rounds: int, *, root: Path | None = None, echo=_progress,
                 live: bool = False, verbose: bool = False) -> dict:
    """Set up the run if needed, then train rounds until `rounds` checkpoints past ckpt-0000 exist, printing
    (through `echo`) one summary line per finished round. With `live`, the console (stdout) shows each round's
    progress: on a terminal one status line, redrawn in place (phase, rate, ETA). With `verbose`, also every
    line of the rounds' logs (generation, each optimizer step, MDI) and each phase's timing, which
    run_terminal.md holds either way.

    Resumable at any point: a killed run leaves only complete checkpoints (plus temporaries removed here),
    rounds are deterministic per seed, and MLflow metrics go through the journal (see dapo_ops.tracking.facade)."""
    from dapo_ops.common import faults
    from dapo_ops.data import rl_loading
    from dapo_ops.store.layout import RunStore

    # The data decides the default accuracy reward; an unknown layout stops here, before anything is written.
    config = rl_loading.config_for_dataset(config)
    root = root or data_root()
    store = RunStore(root, config.run_name)
    started = time.perf_counter()
    console = Console(live=live and echo is _progress, verbose=verbose)
    # The lock comes first, before seconds of imports: a second `make run` of this run is refused at once.
    with store.lock():
        faults.point("run_start")
        with tracked_run(store, echo) as tracker, console.attached():
            home = _train_locked(config, rounds, store, tracker, echo=echo, console=console, started=started)
    tracking_uri = resolve_tracking_uri(root)
    summary = {
        "run_name": config.run_name,
        "checkpoints": str(store.checkpoints_dir),
        "reports": str(store.run_dir / "reports"),
        "mlflow": tracking_uri,
        "dagster_home": str(home),
    }
    echo("")
    echo(f"Run {config.run_name!r} finished {rounds} round(s) in {time.perf_counter() - started:.0f}s.")
    echo(f"  checkpoints: {summary['checkpoints']}")
    echo(f"  reports:     {summary['reports']}/ckpt-NNNN/{{rollout_results,attention_diagnostics,run_terminal}}.md")
    echo(f"  MLflow:      {tracking_uri} (experiment 'dapo-vlm', run '{config.run_name}'; `make mlflow-ui`)")
    echo(f"  Dagster:     DAGSTER_HOME={home} (`make ui`)")
    return summary


class Console:
    """What `make run` prints while rounds run besides their summary lines. `live`: progress on stdout (a
    status line per round on a terminal; each phase's timing line when piped and `verbose`). `verbose` (with
    `live`): the rounds' log lines too (the multi-process phases' children read `CONSOLE_ECHO_ENV`)."""

    def __init__(self, *, live: bool, verbose: bool, file=None) -> None:
        self.live, self.verbose, self.file = live, verbose, file or sys.stdout

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The round logs' console echo (verbose), and on a terminal the library's warnings above the status
        line (elsewhere Python's last-resort handler prints them on stderr)."""
        from dapo_ops.run import phases as training

        echo_logs = self.live and self.verbose
        previous_env = os.environ.get(training.CONSOLE_ECHO_ENV)
        os.environ[training.CONSOLE_ECHO_ENV] = "1" if echo_logs else "0"
        if echo_logs:
            training.set_console_echo(lambda line: _progress(f"    {line}"))
        handler = _WarningsAboveStatus(shown=not echo_logs) if self.live and self.file.isatty() else None
        if handler is not None:
            training.logger.addHandler(handler)
        try:
            yield
        finally:
            if handler is not None:
                training.logger.removeHandler(handler)
            training.set_console_echo(None)
            if previous_env is None:
                os.environ.pop(training.CONSOLE_ECHO_ENV, None)
            else:
                os.environ[training.CONSOLE_ECHO_ENV] = previous_env

    @contextlib.contextmanager
    def showing(self, label: str, expected_s: float | None = None) -> Iterator[None]:
        """The progress of one round (or the setup) while it runs, cleared before its summary line."""
        from dapo_ops.common import progress

        renderer = progress.console_renderer(self.file, label=label, verbose=self.verbose,
                                             expected_s=expected_s) if self.live else None
        if renderer is None:
            yield
            return
        progress.set_progress(renderer)
        try:
            yield
        finally:
            progress.set_progress(None)


class _WarningsAboveStatus(logging.Handler):
    """The library's warnings printed above the status line (when `shown`; otherwise the verbose round log
    prints them), instead of Python's last-resort handler writing them into it on stderr."""

    def __init__(self, *, shown: bool) -> None:
        super().__init__(logging.WARNING)
        self.shown = shown

    def emit(self, record: logging.LogRecord) -> None:
        if self.shown:
            _progress(f"WARNING {record.getMessage()}")


def _train_locked(config: DapoConfig, rounds: int, store, tracker: Tracker, *, echo, console: Console,
                  started: float) -> Path:
    """`run_training` with the run lock held: clean up after a crash, set up, train the missing rounds."""
    from dapo_ops.common import faults
    from dapo_ops.run import retention
    from dapo_ops.run.resume import needs_setup
    from pipelines.assets import add_checkpoint_partitions
    from pipelines.config import TrainingConfig

    home = prepare_instance(store.root)
    instance = open_instance(home)
    run_config = config.replace(max_rounds=rounds)
    tconfig = TrainingConfig.from_dapo(run_config)
    if console.verbose:
        # The whole config once per `make run` (the rounds log only what a resumed run changes; MLflow has params).
        echo(f"config of {config.run_name}: {json.dumps(run_config.to_dict(), sort_keys=True)}")
    tags = {"dapo/run_name": config.run_name, CLI_PID_TAG: str(os.getpid())}
    removed = store.remove_temporaries()
    if removed:
        echo(f"removed {len(removed)} leftover temporary file(s) of an interrupted write")
    _fail_orphaned_runs(instance, config.run_name, echo)
    if needs_setup(store):
        echo(f"[setup] {config.run_name}: dataset + ckpt-0000 ({config.model_name_or_path})")
        faults.point("before_setup")
        with console.showing(f"[setup] {config.run_name}"):
            materialize(SETUP_JOB, tconfig, instance=instance, tags=tags)
    add_checkpoint_partitions(instance, store.complete_checkpoints())
    retention.catch_up(store, run_config)  # a kill between a round's update.json and its pruning
    with system_metrics(tracker):
        _train_rounds(config, rounds, store, instance, tconfig, tags, echo=echo, console=console, started=started)
    return home


def _train_rounds(config: DapoConfig, rounds: int, store, instance, tconfig, tags, *, echo, console: Console,
                  started: float) -> None:
    """The rounds of `run_training` that are not DONE yet (`resume.pending_rounds`), each materialized with a
    progress display (the previous whole round's duration gives the ETA), then its summary line."""
    from dapo_ops.common import faults
    from dapo_ops.reporting.reports import round_summary
    from dapo_ops.run.resume import pending_rounds
    from dapo_ops.store.layout import read_json

    last_round_s: float | None = None
    for pending in pending_rounds(config.replace(max_rounds=rounds), store):
        label = f"[round {pending.index + 1}/{rounds}]"
        round_start = time.perf_counter()
        if console.verbose:
            echo(f"{label} {pending.key}: {', '.join(pending.phases)}")
        faults.point("before_round")
        with console.showing(f"{label} {pending.key}", expected_s=last_round_s if pending.whole else None):
            materialize(ROUND_JOB, tconfig, selection=None if pending.whole else pending.phases,
                        partition_key=pending.key, instance=instance, tags=tags)
        seconds = time.perf_counter() - round_start
        if pending.whole:
            last_round_s = seconds
        echo(f"{label} done in {seconds:.1f}s (elapsed {time.perf_counter() - started:.0f}s): "
             f"{round_summary(read_json(store.round(pending.key).metrics), config.reward_names)}")


def _fail_orphaned_runs(instance, run_name: str, echo) -> None:
    """Mark this run's Dagster runs that a killed `make run` left STARTED as failed (we hold the run lock,
    so no live CLI process owns them); the UI then shows the interruption instead of a run that never ends."""
    import dagster as dg

    stuck = instance.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED],
        tags={"dapo/run_name": run_name}))
    for run in stuck:
        if run.tags.get(CLI_PID_TAG) not in (None, str(os.getpid())):
            instance.report_run_failed(run, message=f"interrupted: the `make run` process (pid "
                                                    f"{run.tags[CLI_PID_TAG]}) ended without finishing it; resumed")
            echo(f"marked Dagster run {run.run_id[:8]} of an interrupted `make run` as failed")


def reanalyze(run_name: str, checkpoint: str, *, mdi_tolerance: float | None, root: Path | None = None,
              num_processes: int | None = None) -> None:
    import dagster as dg

    from dapo_ops.run.resume import reanalysis_config
    from dapo_ops.run.retention import PrunedCheckpointError
    from dapo_ops.store.layout import RunStore
    from pipelines.config import TrainingConfig

    root = root or data_root()
    prepare_instance(root)
    store = RunStore(root, run_name)
    try:  # a pruned checkpoint: say so before Dagster starts
        values = reanalysis_config(store, checkpoint, mdi_tolerance=mdi_tolerance, num_processes=num_processes)
    except PrunedCheckpointError:
        raise  # `main` prints it and exits 2
    except FileNotFoundError as error:  # no such run or checkpoint
        raise SystemExit(str(error)) from error
    config = TrainingConfig(**values, reanalysis=True)
    instance = dg.DagsterInstance.get()
    materialize(REANALYSIS_JOB, config, partition_key=checkpoint, instance=instance,
                tags={"dapo/run_name": run_name, "dapo/reanalysis": "true"})
    print(f"re-analysed {checkpoint} of {run_name}: {store.reports_dir(checkpoint) / 'attention_diagnostics.md'}")


def export(run_name: str, checkpoint: str, *, merge: bool, out: Path | None, root: Path | None = None) -> int:
    """`make export`: checkpoint -> a directory `AutoModelForImageTextToText.from_pretrained` loads."""
    from dapo_ops.run import export as export_ops
    from dapo_ops.run.retention import PrunedCheckpointError
    from dapo_ops.store.layout import RunStore

    store = RunStore(root or data_root(), run_name)
    target = out or export_ops.default_out(store, checkpoint, merge=merge)
    try:
        written = export_ops.export_checkpoint(store, checkpoint, target, merge=merge)
    except (FileNotFoundError, PrunedCheckpointError) as error:
        print(error, file=sys.stderr)
        return 2
    print(f"exported {checkpoint} of {run_name}{' (LoRA merged)' if merge else ''}: {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train ROUNDS rounds on the embedded default or DATASET/MODEL")
    run.add_argument("--config", type=Path, default=None, metavar="FILE",
                     help="a run config YAML of DapoConfig fields (configs/runs/*.yaml)")
    run.add_argument("--rounds", type=int, default=None, help=f"max_rounds (default {DEFAULT_ROUNDS})")
    run.add_argument("--run-name", default=os.environ.get("RUN_NAME") or None)
    run.add_argument("--dataset", default=None, help=f"dataset (default {EMBEDDED})")
    run.add_argument("--model", default=None, help=f"model_name_or_path (default {EMBEDDED})")
    run.add_argument("--num-processes", type=int, default=None)
    run.add_argument("--quiet", action="store_true", help="no progress display: only one line per round")
    run.add_argument("--verbose", action="store_true",
                     help="also every round-log line (each optimizer step) and each phase's timing")
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="override any DapoConfig field, e.g. --set learning_rate=1e-4 (after --config)")
    plan = sub.add_parser("plan", help="estimate peak accelerator memory per process before the first round")
    plan.add_argument("--config", type=Path, default=None, metavar="FILE")
    plan.add_argument("--model", default=None, help="a model directory (its config.json is enough)")
    plan.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GIB")
    launchpad = sub.add_parser("launchpad-config", help="print a run config file as Dagster launchpad YAML")
    launchpad.add_argument("--config", type=Path, required=True, metavar="FILE")
    default_run_name = os.environ.get("RUN_NAME") or DapoConfig.field_default("run_name")
    export_parser = sub.add_parser("export", help="write a checkpoint as a standalone transformers model directory")
    export_parser.add_argument("--checkpoint", required=True)
    export_parser.add_argument("--run-name", default=default_run_name)
    export_parser.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the base weights")
    export_parser.add_argument("--out", type=Path, default=None, help="default: <run>/export/<checkpoint>[-merged]")
    reanalyze_parser = sub.add_parser("reanalyze", help="re-run the attention analysis of one stored checkpoint")
    reanalyze_parser.add_argument("--checkpoint", required=True)
    reanalyze_parser.add_argument("--run-name", default=default_run_name)
    reanalyze_parser.add_argument("--mdi-tolerance", type=float, default=None)
    reanalyze_parser.add_argument("--num-processes", type=int, default=None, help="default: the run's num_processes")
    sync = sub.add_parser("sync-mlflow", help="send journaled rounds to MLflow")
    sync.add_argument("--run-name", default=None)
    ui = sub.add_parser("mlflow-ui", help="start the MLflow UI on the data root's store")
    ui.add_argument("--port", type=int, default=5000)
    sub.add_parser("prepare-instance", help="create DAGSTER_HOME and its dagster.yaml")
    check = sub.add_parser("check-data", help="load and validate a dataset without training (layout, splits, "
                                              "quarantine reasons, images per prompt, answer kinds)")
    check.add_argument("--dataset", required=True)
    check.add_argument("--model", default=None, help="a model directory: prompt lengths in its tokens")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="dataset_layout, prompt_key, answer_key, image_key")
    args = parser.parse_args(argv)

    if args.command == "prepare-instance":
        print(prepare_instance())
        return 0
    if args.command == "plan":
        return memory_plan_command(args)
    if args.command == "check-data":
        return check_data_command(args)
    if args.command == "launchpad-config":
        from dapo_ops.config.runconfig import RunConfigError, launchpad_yaml

        try:
            print(launchpad_yaml(args.config), end="")
        except RunConfigError as error:
            print(error, file=sys.stderr)
            return 2
        return 0
    if args.command == "run":
        # MLflow's INFO lines (creating the store, the system-metrics monitor) would break into the round lines:
        # set before mlflow is imported, so the phases' child processes inherit it. An exported
        # MLFLOW_LOGGING_LEVEL wins, as in MLflow.
        with _env_default("MLFLOW_LOGGING_LEVEL", None if args.verbose else "WARNING"):
            return _run_command(args)
    if args.command == "reanalyze":
        from dapo_ops.run.retention import PrunedCheckpointError

        try:
            reanalyze(args.run_name, args.checkpoint, mdi_tolerance=args.mdi_tolerance,
                      num_processes=args.num_processes)
        except PrunedCheckpointError as error:
            print(error, file=sys.stderr)
            return 2
        return 0
    if args.command == "export":
        return export(args.run_name, args.checkpoint, merge=args.merge, out=args.out)
    if args.command == "sync-mlflow":
        return sync_mlflow(args.run_name)
    if args.command == "mlflow-ui":
        return mlflow_ui(args.port)
    return 2


def memory_plan_command(args: argparse.Namespace) -> int:
    """`make plan`: the memory estimate of a run config (paths need only hold a config.json)."""
    from dapo_ops.config.runconfig import RunConfigError, coerce, read_yaml
    from dapo_ops.train import memory_plan

    values = coerce(read_yaml(args.config), f"run config {args.config}") if args.config else {}
    model = args.model or values.get("model_name_or_path", EMBEDDED)
    # The plan reads no weights; of the data only the images per prompt, when the dataset is on this machine.
    dataset = values.get("dataset", EMBEDDED)
    values = {**values, "model_name_or_path": EMBEDDED, "dataset": dataset if Path(dataset).exists() else EMBEDDED}
    try:
        from dapo_ops.config.runconfig import load_run_config
        from dapo_ops.data.rl_loading import images_per_prompt

        config = load_run_config(None, args.set, flags=values).replace(model_name_or_path=model)
        images, source = images_per_prompt(config)
        print(f"images per prompt: {images} (from {source})")
        plan = memory_plan.estimate(model, config, images_per_prompt=images)
    except (RunConfigError, FileNotFoundError, ValueError) as error:
        print(error, file=sys.stderr)
        return 2
    print(memory_plan.render(plan, config, args.gpu_memory))
    return 0 if args.gpu_memory is None or plan.peak <= args.gpu_memory * memory_plan.GIB else 1


def check_data_command(args: argparse.Namespace) -> int:
    """`make check-data`: the data check's report; 1 when no row is usable, 2 when the source cannot be read."""
    from dapo_ops.config.runconfig import RunConfigError, load_run_config
    from dapo_ops.data.rl_loading import check_dataset

    try:
        config = load_run_config(None, args.set, flags={"dataset": args.dataset})
        counter = None
        if args.model:
            from dapo_ops.models import loading as models
            from dapo_ops.run import phases as training

            policy = models.load_policy(Path(args.model))
            counter = lambda rows: training.prompt_token_counts(policy, rows)  # noqa: E731
        report = check_dataset(config.dataset, layout=config.dataset_layout, prompt_key=config.prompt_key,
                               answer_key=config.answer_key, image_key=config.image_key, count_prompt_tokens=counter)
    except (RunConfigError, ValueError, FileNotFoundError) as error:
        print(error, file=sys.stderr)
        return 2
    print(report.render())
    return 0 if report.usable else 1


def run_config_from_args(args: argparse.Namespace) -> DapoConfig:
    """Defaults < --config FILE < the explicit flags (--run-name, --dataset, --model, --num-processes,
    --rounds: what `make run RUN_NAME=... ROUNDS=...` passes) < --set overrides; raises `RunConfigError`
    naming the key and the file."""
    from dapo_ops.config.runconfig import load_run_config

    flags = {"run_name": args.run_name, "dataset": args.dataset, "model_name_or_path": args.model,
             "num_processes": args.num_processes, "max_rounds": args.rounds}
    return load_run_config(args.config, args.set, flags={k: v for k, v in flags.items() if v is not None})


@contextlib.contextmanager
def _env_default(name: str, value: str | None) -> Iterator[None]:
    """`name=value` in the environment unless it is set (or `value` is None), for the block only."""
    added = value is not None and name not in os.environ
    if added:
        os.environ[name] = value
    try:
        yield
    finally:
        if added:
            os.environ.pop(name, None)


def _run_command(args: argparse.Namespace) -> int:
    """`run`: the exit codes of docs/outputs.md."""
    try:
        config = run_config_from_args(args)
    except (ValueError, TypeError) as error:
        print(error, file=sys.stderr)
        return 2
    try:
        run_training(config, config.max_rounds, live=not args.quiet, verbose=args.verbose)
    except KeyboardInterrupt as error:
        print(f"\nmake run {error or 'interrupted'}: its MLflow run is marked KILLED; `make run` resumes it",
              file=sys.stderr)
        return 128 + getattr(error, "signum", signal.SIGINT)
    except Exception as error:  # noqa: BLE001 - the CLI reports, the traceback is in the Dagster run
        from dapo_ops.store.layout import RunLockedError
        if isinstance(error, EvalDropError):
            print(f"\nmake run stopped: {error}", file=sys.stderr)
            return 4
        print(f"\nmake run failed: {error}", file=sys.stderr)
        return 3 if isinstance(error, RunLockedError) else 1
    return 0


def sync_mlflow(run_name: str | None) -> int:
    """Send every run's journaled rounds and run status; 1 when something could not be sent (MLflow
    unreachable: it stays journaled), 2 when `run_name` has no run directory, else 0."""
    try:
        results = sync_runs(data_root(), run_name)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    for result in results:
        print(f"{result.run_name}: sent {result.sent} journaled round(s) to {result.uri}")
        if not result.complete:
            print(f"{result.run_name}: NOT sent: {result.left} round(s) stay in {result.journal}"
                  f"{'' if result.left else ' (and the run status)'}: {result.error}", file=sys.stderr)
    return 0 if all(result.complete for result in results) else 1


def mlflow_ui(port: int) -> int:
    # MLflow's job runner (GenAI scorer jobs, which this project never submits) starts a pool of consumer
    # processes with the UI; an exported value wins.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    from dapo_ops.tracking.mlflow_sink import ensure_store

    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(root)
    ensure_store(uri)  # a new store built as `make run` builds it, not in place by the server
    artifacts = root / "mlartifacts"
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port)])


if __name__ == "__main__":
    sys.exit(main())
