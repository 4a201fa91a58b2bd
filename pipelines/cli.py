"""`python -m pipelines.cli`: what the Makefile targets call.

`run` materializes the asset graph through Dagster, in this process, recorded in the instance at
`DAGSTER_HOME`, so that `make ui` afterwards shows every materialization. It resumes from the newest
complete checkpoint and finishes a round whose reports were interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dapo_ops.config.dapo import EMBEDDED, DapoConfig, data_root
from dapo_ops.tracking.facade import Tracker, resolve_tracking_uri

DAGSTER_YAML = """\
# Written by dapo-vlm: SQLite storage under DAGSTER_HOME, no telemetry.
telemetry:
  enabled: false
"""

# Tags the Dagster runs `make run` starts with its pid, so a resumed run can tell its own from orphans.
CLI_PID_TAG = "dapo/cli_pid"
DEFAULT_ROUNDS = DapoConfig().max_rounds


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
            from pipelines.checks import EvalDropError

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
                 live: bool = False) -> dict:
    """Set up the run if needed, then train rounds until `rounds` checkpoints past ckpt-0000 exist.
    With `live`, every line of the rounds' logs (generation, each optimizer step, MDI) is printed too, and the
    progress of each long phase: bars on a terminal, plain lines otherwise (`dapo_ops.common.progress`).

    Resumable at any point: a killed run leaves only complete checkpoints (plus temporaries removed here),
    rounds are deterministic per seed, and MLflow metrics go through the journal (see dapo_ops.tracking.facade)."""
    from dapo_ops.common import faults
    from dapo_ops.store.layout import RunStore

    root = root or data_root()
    store = RunStore(root, config.run_name)
    started = time.perf_counter()
    # The lock comes first, before seconds of imports: a second `make run` of this run is refused at once.
    with store.lock():
        faults.point("run_start")
        with _tracked_run(store, echo) as tracker, _console_progress(live and echo is _progress):
            home = _train_locked(config, rounds, store, tracker, echo=echo, live=live, started=started)
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


@contextlib.contextmanager
def _console_progress(show: bool) -> Iterator[None]:
    """Progress of generation, teacher-forced passes and optimizer steps on stdout while rounds run."""
    from dapo_ops.common import progress

    if not show:
        yield
        return
    progress.set_progress(progress.console_renderer(sys.stdout))
    try:
        yield
    finally:
        progress.set_progress(None)


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT reached `make run`: its MLflow run ends KILLED (kill -9 cannot be caught: the
    run then stays RUNNING until the next `make run` of the same RUN_NAME continues it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _catch_termination() -> Iterator[list[int]]:
    """SIGTERM/SIGINT raise `RunInterrupted` in the main thread; yields the signals received so far
    (Dagster may turn the exception into a step failure: the list still says it was a kill)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, _frame) -> None:
        received.append(signum)
        raise RunInterrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _tracked_run(store, echo) -> Iterator[Tracker]:
    """The MLflow run's lifecycle around one `make run`: RUNNING (the same run id when resumed) while it
    trains, then FINISHED when every round is done, FAILED when a round fails, KILLED on SIGTERM/SIGINT.
    The status goes through the journal, so one that MLflow misses now is sent by the next sync.
    (Rounds that `dagster dev`'s sensor launches leave the run RUNNING between rounds; the round that
    reaches `max_rounds` ends it FINISHED in `training_report`.) Yields the run's tracker."""
    import warnings

    tracker = Tracker(store.run_dir, store.run_name, tracking_uri=resolve_tracking_uri(store.root),
                      data_root=store.root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an outage here is reported by the rounds themselves
        tracker.set_status("RUNNING")
    status = "FAILED"
    with _catch_termination() as received:
        try:
            yield tracker
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "KILLED" if received else "FAILED"
            raise
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                shown = tracker.end(status)
            _report_unsent(tracker, status, shown, echo)


def _report_unsent(tracker, status: str, shown: bool, echo) -> None:
    """Say so when rounds or the run's end wait in the journal (MLflow unreachable)."""
    from dapo_ops.tracking.facade import redact_uri

    left = tracker.pending()
    if left:
        echo(f"WARNING: MLflow at {redact_uri(tracker.tracking_uri)} is unreachable: {len(left)} round(s) wait in "
             f"{tracker.journal_path}; the next round or `make sync-mlflow` sends them, each metric once.")
    elif not shown and tracker.last_error is not None:
        echo(f"WARNING: MLflow at {redact_uri(tracker.tracking_uri)} is unreachable: the run's end ({status}) "
             f"waits in {tracker.state_dir}; `make sync-mlflow` sends it.")


def _train_locked(config: DapoConfig, rounds: int, store, tracker: Tracker, *, echo, live: bool,
                  started: float) -> Path:
    """`run_training` with the run lock held: clean up after a crash, set up, train the missing rounds."""
    from dapo_ops.common import faults
    from dapo_ops.run import phases as training
    from dapo_ops.run import retention
    from dapo_ops.store.layout import checkpoint_key
    from pipelines.assets import add_checkpoint_partitions
    from pipelines.config import TrainingConfig

    home = prepare_instance(store.root)
    instance = open_instance(home)
    run_config = config.replace(max_rounds=rounds)
    tconfig = TrainingConfig.from_dapo(run_config)
    # The whole config once per `make run` (the rounds log only what a resumed run changes; MLflow has params).
    echo(f"config of {config.run_name}: {json.dumps(run_config.to_dict(), sort_keys=True)}")
    tags = {"dapo/run_name": config.run_name, CLI_PID_TAG: str(os.getpid())}
    if live:
        training.set_console_echo(lambda line: echo(f"    {line}"))
    removed = store.remove_temporaries()
    if removed:
        echo(f"removed {len(removed)} leftover temporary file(s) of an interrupted write")
    _fail_orphaned_runs(instance, config.run_name, echo)
    if not (store.is_complete_checkpoint(checkpoint_key(0)) and store.setup_marker.exists()):
        echo(f"[setup] {config.run_name}: dataset + ckpt-0000 ({config.model_name_or_path})")
        faults.point("before_setup")
        materialize(SETUP_JOB, tconfig, instance=instance, tags=tags)
    add_checkpoint_partitions(instance, store.complete_checkpoints())
    retention.catch_up(store, run_config)  # a kill between a round's update.json and its pruning
    with _system_metrics(tracker):
        _train_rounds(config, rounds, store, instance, tconfig, tags, echo=echo, started=started)
    return home


@contextlib.contextmanager
def _system_metrics(tracker: Tracker) -> Iterator[None]:
    """MLflow system metrics (CPU, memory, GPU when present) on the training run while rounds run (its id is
    known by now: setup created the run, and `tracker` reads it from the journal's cache)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an outage is reported by the rounds themselves
        with tracker.system_metrics():
            yield


def _train_rounds(config: DapoConfig, rounds: int, store, instance, tconfig, tags, *, echo, started: float) -> None:
    """The rounds of `run_training` that are not DONE yet, in order."""
    from dapo_ops.common import faults, progress
    from dapo_ops.run import phases as training
    from dapo_ops.run import retention
    from dapo_ops.store import layout as store_io
    from dapo_ops.store.layout import checkpoint_key
    from pipelines.config import ROUND_ASSETS

    run_config = config.replace(max_rounds=rounds)
    for k in range(rounds):
        key = checkpoint_key(k)
        files = store.round(key)
        if files.done.exists():
            continue
        selection = None  # the whole training_round job
        # update.json is written right after ckpt-(k+1): with both, only the reports and MLflow are missing;
        # otherwise the round runs again from ckpt-k (rounds are deterministic: the same result).
        if store.is_complete_checkpoint(checkpoint_key(k + 1)) and files.update.exists():
            selection = ("attention_report", "training_report")
            _require_eval_check(run_config, store, checkpoint_key(k + 1))
        assets = ", ".join(selection or ROUND_ASSETS)
        if files.dir.exists() and any(p != files.log for p in files.dir.iterdir()):
            training.round_log(store, key)(f"resuming {key} after an interruption: {assets}")
        if selection is None:
            # Stop before the round, never halfway through writing its checkpoint.
            retention.check_disk_space(store, key, run_config)
        round_start = time.perf_counter()
        echo(f"[round {k + 1}/{rounds}] {key}: {assets}")
        faults.point("before_round")
        materialize(ROUND_JOB, tconfig, selection=selection, partition_key=key, instance=instance, tags=tags)
        metrics = store_io.read_json(files.metrics)
        progress.finish_all()
        echo(f"[round {k + 1}/{rounds}] done in {time.perf_counter() - round_start:.1f}s "
             f"(elapsed {time.perf_counter() - started:.0f}s): reward {metrics['reward']:.3f}  "
             f"accuracy {metrics['rewards/mc_idx_reward/mean']:.3f}  eval {metrics['eval/accuracy']:.3f}  "
             f"format {metrics['rewards/think_format_reward/mean']:.3f}  "
             f"MDI {metrics['attention/all/mdi']:.2f}  entropy {metrics['entropy']:.3f}")


def _require_eval_check(config: DapoConfig, store, key: str) -> None:
    """Refuse to finish a round whose checkpoint failed the blocking eval check (asked again with today's
    `max_eval_drop`, so `--set max_eval_drop=...` accepts it)."""
    from pipelines.checks import EvalDropError, blocked_message, eval_drop_finding

    finding = eval_drop_finding(config, store, key)
    if finding is not None and not finding.passed:
        raise EvalDropError(f"policy_update: {blocked_message(finding)}")


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

    from dapo_ops.run import retention
    from dapo_ops.store.layout import RunStore, read_json
    from pipelines.config import TrainingConfig

    root = root or data_root()
    prepare_instance(root)
    store = RunStore(root, run_name)
    if not store.config_path.exists():
        raise SystemExit(f"no run {run_name!r} under {root / 'runs'}; pass RUN_NAME=<an existing run>")
    values = read_json(store.config_path)
    store.require_checkpoint(checkpoint)
    retention.require_weights(store, checkpoint)  # a pruned checkpoint: say so before Dagster starts
    if mdi_tolerance is not None:
        values["mdi_tolerance"] = mdi_tolerance
    if num_processes is not None:  # the teacher-forced pass on this many ranks (default: the run's own)
        values["num_processes"] = num_processes
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
    run.add_argument("--quiet", action="store_true", help="only one line per round")
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="override any DapoConfig field, e.g. --set learning_rate=1e-4 (after --config)")
    plan = sub.add_parser("plan", help="estimate peak accelerator memory per process before the first round")
    plan.add_argument("--config", type=Path, default=None, metavar="FILE")
    plan.add_argument("--model", default=None, help="a model directory (its config.json is enough)")
    plan.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GIB")
    launchpad = sub.add_parser("launchpad-config", help="print a run config file as Dagster launchpad YAML")
    launchpad.add_argument("--config", type=Path, required=True, metavar="FILE")
    export = sub.add_parser("export", help="write a checkpoint as a standalone transformers model directory")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--run-name", default=os.environ.get("RUN_NAME") or DapoConfig().run_name)
    export.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the base weights")
    export.add_argument("--out", type=Path, default=None, help="default: <run>/export/<checkpoint>[-merged]")
    re = sub.add_parser("reanalyze", help="re-run the attention analysis of one stored checkpoint")
    re.add_argument("--checkpoint", required=True)
    re.add_argument("--run-name", default=os.environ.get("RUN_NAME") or DapoConfig().run_name)
    re.add_argument("--mdi-tolerance", type=float, default=None)
    re.add_argument("--num-processes", type=int, default=None, help="default: the run's num_processes")
    sync = sub.add_parser("sync-mlflow", help="send journaled rounds to MLflow")
    sync.add_argument("--run-name", default=None)
    ui = sub.add_parser("mlflow-ui", help="start the MLflow UI on the data root's store")
    ui.add_argument("--port", type=int, default=5000)
    sub.add_parser("prepare-instance", help="create DAGSTER_HOME and its dagster.yaml")
    args = parser.parse_args(argv)

    if args.command == "prepare-instance":
        print(prepare_instance())
        return 0
    if args.command == "plan":
        return memory_plan_command(args)
    if args.command == "launchpad-config":
        from dapo_ops.config.runconfig import RunConfigError, launchpad_yaml

        try:
            print(launchpad_yaml(args.config), end="")
        except RunConfigError as error:
            print(error, file=sys.stderr)
            return 2
        return 0
    if args.command == "run":
        try:
            config = run_config_from_args(args)
        except (ValueError, TypeError) as error:
            print(error, file=sys.stderr)
            return 2
        try:
            run_training(config, config.max_rounds, live=not args.quiet)
        except KeyboardInterrupt as error:
            print(f"\nmake run {error or 'interrupted'}: its MLflow run is marked KILLED; `make run` resumes it",
                  file=sys.stderr)
            return 128 + getattr(error, "signum", signal.SIGINT)
        except Exception as error:  # noqa: BLE001 - the CLI reports, the traceback is in the Dagster run
            from dapo_ops.store.layout import RunLockedError
            from pipelines.checks import EvalDropError

            if isinstance(error, EvalDropError):
                print(f"\nmake run stopped: {error}", file=sys.stderr)
                return 4
            print(f"\nmake run failed: {error}", file=sys.stderr)
            return 3 if isinstance(error, RunLockedError) else 1
        return 0
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
    values = {**values, "model_name_or_path": EMBEDDED, "dataset": EMBEDDED}  # the plan reads no weights or data
    try:
        from dapo_ops.config.runconfig import load_run_config

        config = load_run_config(None, args.set, flags=values).replace(model_name_or_path=model)
        plan = memory_plan.estimate(model, config)
    except (RunConfigError, FileNotFoundError) as error:
        print(error, file=sys.stderr)
        return 2
    print(memory_plan.render(plan, config, args.gpu_memory))
    return 0 if args.gpu_memory is None or plan.peak <= args.gpu_memory * memory_plan.GIB else 1


def run_config_from_args(args: argparse.Namespace) -> DapoConfig:
    """Defaults < --config FILE < the explicit flags (--run-name, --dataset, --model, --num-processes,
    --rounds: what `make run RUN_NAME=... ROUNDS=...` passes) < --set overrides; raises `RunConfigError`
    naming the key and the file."""
    from dapo_ops.config.runconfig import load_run_config

    flags = {"run_name": args.run_name, "dataset": args.dataset, "model_name_or_path": args.model,
             "num_processes": args.num_processes, "max_rounds": args.rounds}
    return load_run_config(args.config, args.set, flags={k: v for k, v in flags.items() if v is not None})


def sync_mlflow(run_name: str | None) -> int:
    """Send every run's journaled rounds and run status; 1 when something could not be sent (MLflow
    unreachable: it stays journaled), 2 when `run_name` has no run directory, else 0."""
    from dapo_ops.tracking.facade import Tracker, redact_uri

    root = data_root()
    if run_name and not (root / "runs" / run_name).is_dir():
        print(f"no run {run_name!r} under {root / 'runs'}", file=sys.stderr)
        return 2
    runs = [root / "runs" / run_name] if run_name else sorted((root / "runs").glob("*"))
    uri = resolve_tracking_uri(root)
    unsent: list[str] = []
    for run_dir in runs:
        if run_dir.is_dir():
            tracker = Tracker(run_dir, run_dir.name, tracking_uri=uri, data_root=root)
            sent = tracker.sync()
            print(f"{run_dir.name}: sent {sent} journaled round(s) to {redact_uri(uri)}")
            left = tracker.pending()
            if left or tracker.last_error is not None:
                unsent.append(run_dir.name)
                print(f"{run_dir.name}: NOT sent: {len(left)} round(s) stay in {tracker.journal_path}"
                      f"{'' if left else ' (and the run status)'}: {tracker.last_error}", file=sys.stderr)
    return 1 if unsent else 0


def mlflow_ui(port: int) -> int:
    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(root)
    artifacts = root / "mlartifacts"
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port)])


if __name__ == "__main__":
    sys.exit(main())
