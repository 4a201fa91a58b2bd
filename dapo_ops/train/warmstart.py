"""Supervised warm start: teach a fresh policy the `<think>...</think> Answer: {letter}` format.

A randomly initialised policy earns no reward at all; a short teacher-forced pass on the training rows
gives RL something to improve. By default (`teach="task"`) the targets are the right answers: 45 steps
take the embedded color task to 0.46 (chance 0.25), and on data whose correct letters are skewed (A and B
are valid for every question of a 2-8 choice set) they also teach that skew. With `teach="format"` the
targets name a choice drawn uniformly at random: the policy learns the format and no letter prior, and
ckpt-0000 sits at chance; but measured on the embedded model, RL from there did not leave chance within
8 rounds (learning rate 5e-4) and collapsed the format at 2e-3, so it is not the default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F

from dapo_ops.models.inputs import LETTERS, PromptBatch, encode_prompts, format_choices, to_pil
from dapo_ops.models.loading import Policy
from dapo_ops.models.tokens import THINK_END, THINK_START
from dapo_ops.rollout.generate import RolloutBatch

try:  # the data helper's decoder (handles transparency); ours is the fallback
    from dapo_ops.data.loading import decode_image as _decode_image
except ImportError:  # pragma: no cover - only before dapo_ops.data.loading exists
    _decode_image = None


def _answer_index(row: Mapping[str, Any]) -> int:
    value = row.get("correct_choice_idx")
    if value is None:
        value = row.get("label_idx")
    if value is None:
        raise ValueError("a warm-start row needs correct_choice_idx (or label_idx)")
    return int(value)


WARMUP_TARGETS = ("task", "format")
WARMUP_ANSWERS = ("letter", "choice")


def _answer(choices: Sequence[str], index: int, answer: str) -> str:
    """What follows `Answer: `: the letter (`B`) or the choice's own text (`green`); `mc_idx_reward` scores
    both (a unique verbatim choice is an answer)."""
    if answer not in WARMUP_ANSWERS:
        raise ValueError(f"answer={answer!r} is unknown; use one of {', '.join(WARMUP_ANSWERS)}")
    return LETTERS[index] if answer == "letter" else str(choices[index])


def target_completion(row: Mapping[str, Any], answer: str = "letter") -> str:
    """`<think>{first rationale}</think> Answer: {letter}` (or `{choice}`), without the closing `<|im_end|>`;
    a free-form row (no `choices`) answers its `solution`."""
    rationales = [r for r in (row.get("rationales") or []) if r and r.strip()]
    if row.get("choices") is None:
        solution = str(row.get("solution") or "").strip()
        if not solution:
            raise ValueError("a free-form warm-start row needs a solution")
        rationale = rationales[0].strip() if rationales else f"The answer is {solution}."
        return f"{THINK_START}{rationale}{THINK_END} Answer: {solution}"
    index = _answer_index(row)
    choices = list(row["choices"])
    rationale = rationales[0].strip() if rationales else f"The answer is {choices[index]}."
    return f"{THINK_START}{rationale}{THINK_END} Answer: {_answer(choices, index, answer)}"


def format_target(row: Mapping[str, Any], index: int, answer: str = "letter") -> str:
    """`<think>The answer is {choice}.</think> Answer: {letter}` (or `{choice}`) for choice `index`, right or not."""
    choices = list(row["choices"])
    if not 0 <= index < len(choices):
        raise ValueError(f"choice index {index} is out of range for {len(choices)} choices")
    return f"{THINK_START}The answer is {choices[index]}.{THINK_END} Answer: {_answer(choices, index, answer)}"


def corpus_from_rows(rows: pl.DataFrame | Sequence[Mapping[str, Any]]) -> list[str]:
    """Texts a tokenizer for these rows should cover: questions, lettered choices, rationales, targets."""
    records = rows.to_dicts() if isinstance(rows, pl.DataFrame) else list(rows)
    texts: list[str] = []
    for row in records:
        texts.append(str(row["question"]))
        if row.get("choices") is not None:
            texts.append(format_choices(list(row["choices"])))
        texts.extend(str(r) for r in (row.get("rationales") or []))
        texts.append(target_completion(row))
    return texts


def _image(value: Any) -> Any:
    if _decode_image is not None and isinstance(value, bytes | bytearray | memoryview):
        return _decode_image(value)
    return to_pil(value)


def _row_images(row: Mapping[str, Any]) -> Any:
    """Every image of a row (`images`), else its one `image`."""
    if row.get("images"):
        return [_image(v) for v in row["images"]]
    return _image(row["image"])


def teacher_forcing_batch(policy: Policy, prompts: PromptBatch, targets: Sequence[str]) -> RolloutBatch:
    """A `RolloutBatch` (G = 1) whose completions are `targets` + the end of turn, for teacher forcing."""
    tokenizer = policy.tokenizer
    target_ids = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + [policy.eos_token_id] for t in targets
    ]
    lengths = torch.tensor([len(ids) for ids in target_ids], dtype=torch.long)
    width = int(lengths.max())
    completion_ids = torch.full((len(targets), width), policy.pad_token_id, dtype=torch.long)
    for i, ids in enumerate(target_ids):
        completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return RolloutBatch(
        prompt_ids=prompts.input_ids,
        prompt_mask=prompts.attention_mask,
        vision=prompts.vision,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        completion_lengths=lengths,
        is_eos=torch.ones(len(targets), dtype=torch.bool),
        completions=list(targets),
        prompt_index=torch.arange(len(targets)),
        num_generations=1,
        prompt_vision_mask=prompts.vision_mask,
        prompt_text_mask=prompts.text_mask,
        prompt_token_inputs=dict(prompts.token_inputs),
        completion_values=dict(prompts.completion_values),
    )


def completion_cross_entropy(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """Mean token cross-entropy of the completion tokens given prompt and image (differentiable)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.model_inputs().items()}
    width = batch.completion_ids.shape[1]
    # Only the last Tc+1 positions matter: position p predicts token p+1.
    logits = model(**inputs, use_cache=False, logits_to_keep=width + 1).logits[:, :-1].float()
    mask = batch.completion_mask.to(device).float()
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch.completion_ids.to(device).reshape(-1), reduction="none"
    ).view_as(mask)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def supervised_warm_start(
    policy: Policy,
    rows: pl.DataFrame,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    on_step: Callable[[int, float], None] | None = None,
    teach: str = "task",
    answer: str = "letter",
) -> list[float]:
    """`steps` AdamW steps of teacher-forced cross-entropy on a target completion + `<|im_end|>`.

    `teach="format"`: `format_target(row, j)` with j uniform over the row's choices (seeded); `"task"`:
    `target_completion(row)`, the right answer. Batches are drawn from per-epoch seeded permutations of
    `rows` (A-OKVQA layout; only completion tokens are scored). Returns the loss of every step; the model
    is left in eval mode.
    """
    if teach not in WARMUP_TARGETS:
        raise ValueError(f"teach={teach!r} is unknown; use one of {', '.join(WARMUP_TARGETS)}")
    _answer(["x"], 0, answer)  # validates `answer` before any work
    if steps <= 0 or rows.height == 0:
        return []
    model = policy.model
    records = rows.select(
        [
            c
            for c in ("question", "choices", "image", "images", "solution", "system_prompt", "rationales",
                      "correct_choice_idx", "label_idx")
            if c in rows.columns
        ]
    ).to_dicts()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    try:
        for step in range(steps):
            picked: list[int] = []
            while len(picked) < min(batch_size, len(records)):
                if not order:
                    order = torch.randperm(len(records), generator=generator).tolist()
                picked.append(order.pop())
            batch_rows = [records[i] for i in picked]
            prompts = encode_prompts(
                policy,
                [r["question"] for r in batch_rows],
                [None if r.get("choices") is None else list(r["choices"]) for r in batch_rows],
                [_row_images(r) for r in batch_rows],
                system_prompts=[r.get("system_prompt") for r in batch_rows],
            )
            if teach == "task":
                targets = [target_completion(r, answer) for r in batch_rows]
            else:  # free-form rows have no choice to draw: their target is the answer
                targets = [target_completion(r, answer) if r.get("choices") is None else
                           format_target(r, int(torch.randint(len(r["choices"]), (), generator=generator)), answer)
                           for r in batch_rows]
            batch = teacher_forcing_batch(policy, prompts, targets)
            loss = completion_cross_entropy(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        model.eval()
    return losses
