"""The diagnostics tell a model that reads the image from one that needs none.

On the embedded colour task the answer is only in the image; on the shortcut set built here (the same rows with
the right answer moved to choice A, the image still showing it) the letter alone answers every question. After
the supervised warm start and one RL round on each, the masked pass and the blind eval must separate them: the
image changes the first model's answers (visual KL > 0, visual gain > 0), not the second's.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from dapo_ops.config.dapo import EMBEDDED, DapoConfig
from dapo_ops.data import synthetic
from dapo_ops.run import phases as training
from dapo_ops.run import round as dapo_round
from dapo_ops.store.layout import RunStore, checkpoint_key

SMALL = dict(prompts_per_round=4, num_generations=2, max_completion_length=20, steps_per_generation=1,
             num_iterations=1, num_train_examples=256, num_eval_examples=32, eval_subset_size=16, warmup_steps=45,
             synthetic_tasks=["color"])


def write_shortcut_dataset(out: Path, num_train: int, num_eval: int, seed: int = 0) -> Path:
    """The embedded colour task with the right answer always first: the same images, questions and choices."""
    for path in synthetic.write_dataset(out, num_train=num_train, num_eval=num_eval, seed=seed,
                                        tasks=("color",)).values():
        rows = pl.read_parquet(path)
        choices = [[c[i], *(x for j, x in enumerate(c) if j != i)]
                   for c, i in zip(rows["choices"].to_list(), rows["correct_choice_idx"].to_list(), strict=True)]
        rows.with_columns(pl.Series("choices", choices),
                          pl.lit(0, dtype=pl.Int64).alias("correct_choice_idx")).write_parquet(path)
    return out


def train_one_round(tmp_path: Path, name: str, dataset: str) -> dict[str, float]:
    config = DapoConfig(run_name=name, dataset=dataset, visual_dependency=True, **SMALL)
    store = RunStore(tmp_path, name)
    key = checkpoint_key(0)
    log = training.round_log(store, key)
    training.prepare_dataset(config, store)
    policy = training.build_base_checkpoint(config, store, log)["policy"]
    optimizer = training.load_optimizer(store, key, policy, config)
    return dapo_round.run_round(config, store, key, policy, optimizer, log).metrics


def test_the_shortcut_dataset_answers_a_and_keeps_the_answers_colour_in_the_image(tmp_path: Path) -> None:
    original = pl.read_parquet(synthetic.write_dataset(tmp_path / "o", num_train=8, num_eval=2, seed=0,
                                                       tasks=("color",))["train"])
    shortcut = pl.read_parquet(write_shortcut_dataset(tmp_path / "s", 8, 2) / "train.parquet")
    assert shortcut["correct_choice_idx"].to_list() == [0] * 8
    assert [c[0] for c in shortcut["choices"].to_list()] == [
        c[i] for c, i in zip(original["choices"].to_list(), original["correct_choice_idx"].to_list(), strict=True)]
    assert shortcut["image"].to_list() == original["image"].to_list()


@pytest.mark.slow
def test_after_training_the_diagnostics_tell_image_use_from_a_shortcut(tmp_path: Path) -> None:
    reads = train_one_round(tmp_path, "reads-the-image", EMBEDDED)
    shortcut = train_one_round(tmp_path, "shortcut", str(write_shortcut_dataset(tmp_path / "shortcut-data", 256, 32)))
    assert shortcut["eval/accuracy"] == 1.0  # the shortcut is learned ...
    assert shortcut["eval/visual_gain"] == 0.0  # ... and needs no image
    assert shortcut["visual/kl_answer"] < 1e-4 and shortcut["visual/kl_mean"] < 1e-4
    assert reads["eval/visual_gain"] >= 0.1
    assert reads["visual/kl_answer"] > 100 * max(shortcut["visual/kl_answer"], 1e-6)
    assert reads["visual/kl_mean"] > 100 * max(shortcut["visual/kl_mean"], 1e-6)
