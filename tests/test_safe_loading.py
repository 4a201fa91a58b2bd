"""Loading a checkpoint, a round or a model directory never runs code from it."""

from __future__ import annotations

import json
import pathlib
import re
from pathlib import Path

import pytest
import torch

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.models import loading as models
from dapo_ops.run import phases as training
from dapo_ops.run.round_files import load_old_logps, load_rollout_batch
from dapo_ops.store.layout import RunStore, UnsafeFileError, checkpoint_key, write_torch_atomic
from pipelines.resources import PolicyCache

REPO = Path(__file__).resolve().parents[1]
CORPUS = ["What color is the shape?", "red green blue yellow", "The shape is red."]


class _TouchOnLoad:
    """Unpickling this calls `Path(marker).touch()`: what a crafted optimizer.pt could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def policy(embedded_policy_for) -> models.Policy:
    return embedded_policy_for(CORPUS, seed=0)


@pytest.fixture
def trained(policy: models.Policy, tmp_path: Path) -> tuple[RunStore, DapoConfig, str]:
    """ckpt-0001 written by the real `save_checkpoint`, with a real AdamW state after one step."""
    config = DapoConfig(learning_rate=1e-3)
    store = RunStore(tmp_path, "shared")
    optimizer = training.make_optimizer(policy.model, config)
    loss = sum(p.float().pow(2).mean() for p in policy.model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    key = checkpoint_key(1)
    training.save_checkpoint(store, key, policy, optimizer, {"checkpoint": key, "round": 1, "global_step": 1,
                                                             "num_tokens": 0})
    return store, config, key


def test_a_checkpoints_adamw_state_loads_with_weights_only(trained, policy: models.Policy) -> None:
    store, config, key = trained
    saved = torch.load(store.checkpoint_dir(key) / training.OPTIMIZER_FILE, weights_only=True)
    optimizer = training.load_optimizer(store, key, policy, config)
    assert optimizer.state_dict()["state"].keys() == saved["state"].keys() and saved["state"]
    first = next(iter(saved["state"]))
    assert torch.equal(optimizer.state_dict()["state"][first]["exp_avg"], saved["state"][first]["exp_avg"])


def test_a_planted_optimizer_pickle_is_refused_on_resume_and_its_code_never_runs(trained, tmp_path: Path) -> None:
    """The optimizer of a resumed round is loaded by `PolicyCache.optimizer` (what `policy_update` calls)."""
    store, config, key = trained
    marker = tmp_path / "pwned"
    planted = store.checkpoint_dir(key) / training.OPTIMIZER_FILE
    torch.save({"state": {}, "param_groups": [], "payload": _TouchOnLoad(marker)}, planted)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UnsafeFileError, match=re.escape(f"{key}/optimizer.pt") + ".*refusing to load it"):
        PolicyCache().optimizer(store, key, config)
    assert not marker.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("name", ["rollouts_pt", "old_logps"])
def test_a_planted_round_file_is_refused_and_named(tmp_path: Path, name: str) -> None:
    store = RunStore(tmp_path, "shared")
    marker = tmp_path / "pwned"
    path = getattr(store.round("ckpt-0000"), name)
    write_torch_atomic(path, {"per_token_logps": _TouchOnLoad(marker)})
    load = load_rollout_batch if name == "rollouts_pt" else load_old_logps
    with pytest.raises(UnsafeFileError, match=re.escape(f"ckpt-0000/{path.name}")):
        load(store, "ckpt-0000")
    assert not marker.exists()


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json", "preprocessor_config.json"])
def test_a_model_directory_asking_for_remote_code_is_refused(policy: models.Policy, tmp_path: Path,
                                                             config_file: str) -> None:
    model_dir = models.save_policy(policy, tmp_path / "model")
    path = model_dir / config_file
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"{config_file} asks for remote code") + ".*trust_remote_code off"):
        models.load_policy(model_dir)


def test_no_code_loading_switch_is_turned_on_in_the_library_or_the_pipelines() -> None:
    offending = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("dapo_ops", "pipelines")
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"weights_only\s*=\s*False|trust_remote_code\s*=\s*True", line)
    ]
    assert offending == []
