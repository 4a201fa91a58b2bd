"""Does the attention reward move attention? Train the embedded default with the attention reward off, with
`clip` and with `group_log_distance`, for several seeds, and compare per round mean |ln MDI| per stage and
greedy eval accuracy (mean ± std over seeds).

    python -m benchmarks.ablation [--seeds 0 1 2] [--rounds 8]     # `make ablation`

Writes benchmarks/ablation.json (per-run curves, per-row aggregates and a `summary`), ablation.md (the
table) and ablation.png (the curves). A row is a name plus `DapoConfig` overrides, so objectives (loss
types) or other reward settings are added as rows in `ROWS` without touching the rest.

Round k's MDI is that of the rollouts of ckpt-k; one extra attention pass over rollouts of the final
checkpoint gives the "last round" value, the attention after the last update.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapo_ops.config import MDI_SHAPINGS, STAGES, DapoConfig

OUT_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Row:
    """One ablation row: a name and the `DapoConfig` fields it changes from the default."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def attention_off(config: DapoConfig) -> list[float]:
    """The default reward weights with the attention reward's weight set to 0."""
    weights = list(config.reward_weights)
    weights[-1] = 0.0
    return weights


def default_rows(config: DapoConfig | None = None) -> list[Row]:
    config = config or DapoConfig()
    """Attention reward off, then one row per MDI shaping (named after it)."""
    return [Row("off", {"reward_weights": attention_off(config)}),
            *(Row(shaping, {"mdi_shaping": shaping}) for shaping in MDI_SHAPINGS)]


def mean_abs_log_mdi(values: Sequence[float | None]) -> float:
    """Mean of |ln MDI| over the defined (finite, positive) MDIs; NaN when none is defined."""
    logs = [abs(math.log(v)) for v in values if v is not None and math.isfinite(v) and v > 0]
    return sum(logs) / len(logs) if logs else math.nan


def _attention_summary(table: Any) -> dict[str, float]:
    return {stage: mean_abs_log_mdi(table[f"attn/{stage}/mdi"].to_list()) for stage in STAGES}


def train_one(config: DapoConfig, work_dir: Path, rounds: int) -> dict[str, Any]:
    """Train `rounds` rounds through the library; per checkpoint 0..rounds: eval accuracy and |ln MDI|."""
    from dapo_ops import training
    from dapo_ops.store import RunStore, checkpoint_key

    store = RunStore(work_dir, config.run_name)
    log = training.RoundLog(work_dir / f"{config.run_name}.log")
    training.prepare_dataset(config, store)
    policy = training.build_base_checkpoint(config, store, log)["policy"]
    optimizer = training.load_optimizer(store, checkpoint_key(0), policy, config)
    evals = [training.evaluate(config, store, policy)["eval/accuracy"]]
    mdi: list[dict[str, float]] = []
    train_accuracy: list[float] = []
    for k in range(rounds + 1):
        key = checkpoint_key(k)
        training.generate_round_rollouts(config, store, key, policy, log)
        mdi.append(_attention_summary(training.compute_attention(config, store, key, policy, log)))
        if k == rounds:
            break  # the final checkpoint's attention only
        table = training.compute_rewards(config, store, key, log)
        train_accuracy.append(float(table["mc_idx_reward"].mean()))
        record = training.run_update(config, store, key, policy, optimizer, log)
        evals.append(float(record["eval"]["eval/accuracy"]))
    return {"eval_accuracy": evals, "train_accuracy": train_accuracy, "abs_log_mdi": mdi}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per round mean and std over seeds of eval accuracy and of |ln MDI| for each stage."""
    n = min(len(r["eval_accuracy"]) for r in runs)
    out: dict[str, Any] = {"eval_accuracy": [_mean_std([r["eval_accuracy"][k] for r in runs]) for k in range(n)]}
    for stage in STAGES:
        out[f"abs_log_mdi/{stage}"] = [_mean_std([r["abs_log_mdi"][k][stage] for r in runs]) for k in range(n)]
    return out


def summarize(rows: dict[str, dict[str, Any]], default_row: str, off_row: str = "off") -> dict[str, Any]:
    """Last-round ratio of mean |ln MDI| (stage all) and eval accuracy delta, default shaping vs off."""
    if default_row not in rows or off_row not in rows:
        return {"default_row": default_row, "mdi_log_ratio_vs_off": math.nan, "eval_accuracy_delta_vs_off": math.nan,
                "goal": f"needs the rows {off_row!r} and {default_row!r}"}
    mdi_default = rows[default_row]["abs_log_mdi/all"][-1][0]
    mdi_off = rows[off_row]["abs_log_mdi/all"][-1][0]
    acc_default = rows[default_row]["eval_accuracy"][-1][0]
    acc_off = rows[off_row]["eval_accuracy"][-1][0]
    return {
        "default_row": default_row,
        "mdi_log_ratio_vs_off": mdi_default / mdi_off if mdi_off else math.nan,
        "eval_accuracy_delta_vs_off": acc_default - acc_off,
        "goal": "mdi_log_ratio_vs_off <= 0.7 and |eval_accuracy_delta_vs_off| <= 0.03",
    }


def _cell(pair: Sequence[float]) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def markdown(result: dict[str, Any]) -> str:
    rows, summary = result["rows"], result["summary"]
    lines = [
        "# Attention-reward ablation",
        "",
        f"Embedded default, {result['rounds']} rounds; mean ± std over each row's seeds. Round k is "
        "ckpt-k: eval accuracy of ckpt-k and mean |ln MDI| of its rollouts (0 = balanced attention). "
        f"Generated by `{result.get('command', 'make ablation')}`; {result['seconds'] / 60:.1f} min of training.",
        "",
        f"Summary (default shaping `{summary['default_row']}` vs attention reward off, last round): "
        f"mean |ln MDI| ratio **{summary['mdi_log_ratio_vs_off']:.3f}**, eval accuracy delta "
        f"**{summary['eval_accuracy_delta_vs_off']:+.3f}** (goal: {summary['goal']}).",
        "",
        "| row | seeds | round | eval accuracy | " + " | ".join(f"\\|ln MDI\\| {s}" for s in STAGES) + " |",
        "|---|---|---:|---:|" + "---:|" * len(STAGES),
    ]
    for name, agg in rows.items():
        seeds = ",".join(str(r["seed"]) for r in result["runs"][name])
        for k, acc in enumerate(agg["eval_accuracy"]):
            cells = [_cell(agg[f"abs_log_mdi/{s}"][k]) for s in STAGES]
            lines.append(f"| {name} | {seeds} | {k} | {_cell(acc)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    from dapo_ops.charts import _new_figure, _save_atomic

    fig = _new_figure(10, 4)
    panels = [("eval_accuracy", "eval accuracy"), ("abs_log_mdi/all", "mean |ln MDI| (stage all)")]
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, agg in result["rows"].items():
            means = [m for m, _ in agg[key]]
            stds = [s for _, s in agg[key]]
            xs = list(range(len(means)))
            ax.plot(xs, means, marker="o", markersize=3, label=name)
            ax.fill_between(xs, [m - s for m, s in zip(means, stds, strict=True)],
                            [m + s for m, s in zip(means, stds, strict=True)], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round (checkpoint)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_atomic(fig, path)


def run(rows: Sequence[Row], seeds: Sequence[int], rounds: int, out_dir: Path = OUT_DIR,
        base: dict[str, Any] | None = None, default_row: str | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="dapo-ablation-") as tmp:
        for row in rows:
            for seed in seeds:
                config = DapoConfig(**{**(base or {}), **row.overrides, "seed": seed,
                                       "run_name": f"ablation-{row.name}-s{seed}"})
                t0 = time.perf_counter()
                curves = train_one(config, Path(tmp), rounds)
                runs.setdefault(row.name, []).append({"seed": seed, **curves})
                print(f"{row.name} seed {seed}: eval {curves['eval_accuracy'][0]:.3f} -> "
                      f"{curves['eval_accuracy'][-1]:.3f}, |ln MDI| all {curves['abs_log_mdi'][0]['all']:.3f} -> "
                      f"{curves['abs_log_mdi'][-1]['all']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    result = assemble(runs, rounds, default_row or DapoConfig(**(base or {})).mdi_shaping,
                      time.perf_counter() - start)
    write_outputs(result, out_dir)
    return result


def assemble(runs: dict[str, list[dict[str, Any]]], rounds: int, default_row: str, seconds: float) -> dict[str, Any]:
    """The result document from per-row lists of per-seed curves."""
    aggregated = {name: aggregate(r) for name, r in runs.items()}
    seeds = sorted({r["seed"] for row in runs.values() for r in row})
    return {"rounds": rounds, "seeds": seeds, "rows": aggregated, "runs": runs,
            "summary": summarize(aggregated, default_row), "seconds": seconds}


def merge(paths: Sequence[Path], default_row: str) -> dict[str, Any]:
    """One result from several ablation.json files (rows trained separately, e.g. a new objective's)."""
    import json

    runs: dict[str, list[dict[str, Any]]] = {}
    rounds, seconds = set(), 0.0
    for path in paths:
        part = json.loads(Path(path).read_text())
        rounds.add(part["rounds"])
        seconds += part["seconds"]
        for name, row_runs in part["runs"].items():
            known = {r["seed"] for r in runs.get(name, [])}
            runs.setdefault(name, []).extend(r for r in row_runs if r["seed"] not in known)
    if len(rounds) != 1:
        raise ValueError(f"cannot merge ablations of different lengths: rounds {sorted(rounds)} in {list(paths)}")
    result = assemble(runs, rounds.pop(), default_row, seconds)
    result["command"] = "python -m benchmarks.ablation --merge " + " ".join(Path(p).name for p in paths)
    return result


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    from dapo_ops.store import write_json_atomic, write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "ablation.json", result)
    write_text_atomic(out_dir / "ablation.md", markdown(result))
    plot(result, out_dir / "ablation.png")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="attention-reward ablation on the embedded default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=DapoConfig().max_rounds)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--rows", nargs="+", help="row names to train (default: all)")
    parser.add_argument("--merge", type=Path, nargs="+", help="combine these ablation.json files instead of training")
    parser.add_argument("--default-row", help="the row compared with off (default: the default mdi_shaping)")
    args = parser.parse_args(argv)
    from benchmarks.common import set_threads

    set_threads(1)
    if args.merge:
        result = merge(args.merge, args.default_row or DapoConfig().mdi_shaping)
        write_outputs(result, args.out_dir)
        print(markdown(result))
        return
    rows = [r for r in default_rows() if not args.rows or r.name in args.rows]
    result = run(rows, args.seeds, args.rounds, args.out_dir, default_row=args.default_row)
    print(markdown(result))


if __name__ == "__main__":
    main()
