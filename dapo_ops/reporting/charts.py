"""PNG charts for the reports: learning curves across rounds and the per-stage attention balance.

matplotlib is imported inside the functions (it is slow to import and most callers never draw), and only
its object-oriented API with the Agg canvas is used: no pyplot, so no global figure state and no GUI backend.
Files are written through `store.write_bytes_atomic`, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from dapo_ops.common.names import EVAL_ACCURACY
from dapo_ops.config.dapo import STAGES
from dapo_ops.store.layout import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(fig: Figure, path: str | os.PathLike[str]) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return write_bytes_atomic(Path(path), buffer.getvalue())


def _series(history: pl.DataFrame, x: str, column: str) -> tuple[list[float], list[float]]:
    """Points of `column` against `x`, sorted by x, with null/NaN values dropped."""
    if column not in history.columns:
        return [], []
    points = sorted(
        (float(a), float(b))
        for a, b in zip(history.get_column(x).to_list(), history.get_column(column).to_list(), strict=True)
        if a is not None and b is not None and not math.isnan(float(b))
    )
    return [p[0] for p in points], [p[1] for p in points]


def _plot_panel(
    ax: Axes, history: pl.DataFrame, x: str, title: str, lines: list[tuple[str, str]], *, log_y: bool = False
) -> None:
    drawn: list[float] = []
    for column, label in lines:
        xs, ys = _series(history, x, column)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
            drawn += ys
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    # Log scale only makes sense for positive values; MDI spans orders of magnitude when one modality wins.
    if log_y and min(drawn) > 0:
        ax.set_yscale("log")
        # Plain numbers (4, 6) read better than 4x10^0 for MDI values.
        ax.yaxis.set_major_formatter(ScalarFormatter())
        if max(drawn) / min(drawn) < 10:  # minor labels only while they cannot crowd the axis
            ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.legend(fontsize=8)


def learning_curves_png(history: pl.DataFrame, path: str | os.PathLike[str]) -> Path:
    """A 2x2 grid of learning curves, one point per row of `history`, against `round` (else `step`).

    Panels: train accuracy, eval accuracy and format; MDI per stage (log y, dashed line at 1 = balanced);
    entropy; total reward. Columns that are missing are skipped, and null/NaN points are left out.
    """
    x = "round" if "round" in history.columns else "step"
    if x not in history.columns:
        raise ValueError("learning_curves_png: history needs a 'round' or 'step' column")
    fig = _new_figure(10, 7)
    axes = fig.subplots(2, 2)
    _plot_panel(
        axes[0][0],
        history,
        x,
        "Accuracy and format",
        [
            ("rewards/mc_idx_reward/mean", "train accuracy"),
            ("rewards/accuracy_reward/mean", "train accuracy (free form)"),
            (EVAL_ACCURACY, "eval accuracy"),
            ("rewards/think_format_reward/mean", "format"),
        ],
    )
    axes[0][0].set_ylim(-0.05, 1.05)
    _plot_panel(
        axes[0][1],
        history,
        x,
        "MDI per stage",
        [(f"attention/{stage}/mdi", stage) for stage in STAGES],
        log_y=True,
    )
    axes[0][1].axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    _plot_panel(axes[1][0], history, x, "Entropy", [("entropy", "entropy")])
    _plot_panel(
        axes[1][1],
        history,
        x,
        "Total reward",
        [("reward", "reward (update)"), ("rewards/total_reward", "total reward (all rollouts)")],
    )
    fig.tight_layout()
    return _save_atomic(fig, path)


def _balance(mdi: float, tolerance: float) -> float:
    if not (mdi > 0 and math.isfinite(mdi)):
        return math.nan
    return min(1.0, max(0.0, 1.0 - abs(math.log(mdi)) / math.log(tolerance)))


def attention_balance_png(
    stage_means: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str], *, tolerance: float
) -> Path:
    """Per stage, grouped bars of attention share `text_ratio` vs `vision_ratio`, annotated with MDI and
    `mdi_balance` (computed from MDI and `tolerance` when absent). Undefined (NaN) stages show "n/a".
    """
    stages = [s for s in STAGES if s in stage_means] + [s for s in stage_means if s not in STAGES]
    fig = _new_figure(7, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.38

    def value(stage: str, name: str) -> float:
        v = stage_means[stage].get(name)
        return math.nan if v is None else float(v)

    text = [value(s, "text_ratio") for s in stages]
    vision = [value(s, "vision_ratio") for s in stages]
    positions = list(range(len(stages)))
    # NaN bars draw as nothing; 0 keeps matplotlib from warning while the annotation says "n/a".
    ax.bar([p - width / 2 for p in positions], [0 if math.isnan(t) else t for t in text], width, label="text")
    ax.bar(
        [p + width / 2 for p in positions], [0 if math.isnan(v) else v for v in vision], width, label="vision"
    )
    for p, stage in zip(positions, stages, strict=True):
        mdi = value(stage, "mdi")
        balance = value(stage, "mdi_balance")
        if math.isnan(balance):
            balance = _balance(mdi, tolerance)
        label = "n/a" if math.isnan(mdi) else f"MDI {mdi:.2f}\nbalance {balance:.2f}"
        ax.annotate(label, (p, 1.02), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, [s.capitalize() for s in stages])
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("attention share")
    ax.set_title(f"Attention balance per stage (MDI tolerance R = {tolerance:g})", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save_atomic(fig, path)


def visual_dependency_png(history: Sequence[Mapping[str, float]], path: str | os.PathLike[str]) -> Path:
    """Per round: mean |ln MDI| (stage all; 0 = balanced attention) beside the mean visual KL over completions
    and over answers (0 = the image changes nothing). `history`: one mapping per round with `round`,
    `abs_log_mdi`, `kl_mean` and `kl_answer`."""
    rounds = [int(h["round"]) for h in history]
    fig = _new_figure(9, 3.6)
    for i, (keys, title) in enumerate([(("abs_log_mdi",), "mean |ln MDI| (stage all)"),
                                       (("kl_mean", "kl_answer"), "visual KL (nats per token)")]):
        ax = fig.add_subplot(1, 2, i + 1)
        for key in keys:
            ax.plot(rounds, [float(h[key]) for h in history], marker="o", markersize=3,
                    label={"abs_log_mdi": "|ln MDI|", "kl_mean": "completion", "kl_answer": "answer"}[key])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round (checkpoint)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_atomic(fig, path)
