"""Per tiny family: how exactly it is scored (docs/results.md, "Every family scored exactly").

`python scripts/measure_families.py [family ...]` prints one JSON line per family: the lean attention masses vs
the eager oracle (max abs m_V, m_T), the causality probe (max abs change of the earlier completion tokens'
log-probs when only the last one changes, unshared and shared prefix), shared vs unshared log-probs, whether
greedy generation equals the teacher-forced argmax, and the per-token inputs' values over the completion. For
PaliGemma also the probe with the completion marked 0 (the prefix), as the pipeline did before issue 30.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch
from PIL import Image

from dapo_ops.attention.forward import model_inputs
from dapo_ops.attention.teacher_forced import eager_attention_masses, teacher_forced_pass
from dapo_ops.models.inputs import PromptBatch, encode_prompts
from dapo_ops.models.loading import Policy
from dapo_ops.models.tiny_families import BUILDERS, build_tiny_family
from dapo_ops.rollout.generate import RolloutBatch, generate_rollouts
from dapo_ops.train.warmstart import teacher_forcing_batch

# The corpus and prompts of tests/test_families.py.
CORPUS = ["What color is the shape?", "red green blue yellow", "The shape is red.", "<think>blue</think> Answer: C"]
COLORS = ["red", "green", "blue", "yellow"]
QUESTIONS = ["What color is the shape?", "Which shape is it? Look very closely at the picture."]
TARGETS = ["Answer: A", "<think>red</think> Answer: B", "blue green", "The shape is red."]


def _prompts(policy: Policy) -> PromptBatch:
    images = [Image.new("RGB", (56, 56), (255, 0, 0)), Image.new("RGB", (120, 60), (0, 255, 0))]
    return encode_prompts(policy, QUESTIONS, [COLORS, COLORS[:2]], images)


def _fixed(policy: Policy) -> RolloutBatch:
    batch = teacher_forcing_batch(policy, _prompts(policy).select([0, 0, 1, 1]), TARGETS)
    return dataclasses.replace(batch, prompt_index=torch.tensor([0, 0, 1, 1]), num_generations=2)


def causality(policy: Policy, rollouts: RolloutBatch, shared: bool) -> float:
    """Max abs change of the earlier completion tokens' log-probs when only the last one changes."""
    last = rollouts.completion_lengths - 1
    ids = rollouts.completion_ids.clone()
    ids[torch.arange(len(rollouts)), last] = policy.tokenizer("blue", add_special_tokens=False)["input_ids"][0]
    edited = dataclasses.replace(rollouts, completion_ids=ids)
    before = teacher_forced_pass(policy, rollouts, with_attention=False, shared_prefix=shared).per_token_logps
    after = teacher_forced_pass(policy, edited, with_attention=False, shared_prefix=shared).per_token_logps
    earlier = torch.arange(ids.shape[1])[None] < last[:, None]
    return float((before - after)[earlier].abs().max())


def measure(name: str) -> dict:
    policy = build_tiny_family(name, CORPUS, seed=0)
    sampled = generate_rollouts(policy, _prompts(policy), num_generations=2, max_completion_length=6, seed=0)
    lean = teacher_forced_pass(policy, sampled)
    vision, text = eager_attention_masses(policy, sampled)
    fixed = _fixed(policy)
    shared = teacher_forced_pass(policy, fixed, shared_prefix=True).per_token_logps
    unshared = teacher_forced_pass(policy, fixed, shared_prefix=False).per_token_logps
    greedy = generate_rollouts(policy, _prompts(policy), num_generations=1, max_completion_length=8, temperature=0)
    with torch.no_grad():
        logits = policy.model(**model_inputs(policy.model, greedy, torch.device("cpu"))).logits
    width = greedy.completion_ids.shape[1]
    scores = logits[:, -width - 1 : -1].clone()
    scores[..., policy.suppressed_token_ids] = -math.inf
    mask = greedy.completion_mask.bool()
    row = {
        "oracle_mv": float((lean.vision_mass.double() - vision).abs().max()),
        "oracle_mt": float((lean.text_mass.double() - text).abs().max()),
        "causal_unshared": causality(policy, fixed, False),
        "causal_shared": causality(policy, fixed, True),
        "shared_vs_unshared_logp": float((shared - unshared)[fixed.completion_mask.bool()].abs().max()),
        "greedy_eq_argmax": bool(torch.equal(scores.argmax(-1)[mask], greedy.completion_ids[mask])),
        "completion_values": _prompts(policy).completion_values,
    }
    if name == "paligemma":
        row["causal_unshared_with_0_fill"] = causality(policy, dataclasses.replace(fixed, completion_values={
            key: 0 for key in fixed.completion_values}), False)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=sorted(BUILDERS))
    for name in parser.parse_args().families:
        print(name, json.dumps(measure(name)), flush=True)


if __name__ == "__main__":
    main()
