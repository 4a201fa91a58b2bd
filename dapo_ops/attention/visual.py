"""Does the model use the image? The masked pass: every rollout scored again with its image degraded.

Visual dependency of a completion token t (PAPO, arXiv 2507.06448; VPPO, arXiv 2510.09285) is

    KL_t = KL(π(·|q, I, o<t) ‖ π(·|q, I_masked, o<t)) = Σ_v p_v (log p_v − log q_v)

over the full vocabulary, of the temperature-scaled distributions the old log-probs use (docs/metrics.md,
"Visual dependency"). The image is degraded in the family's processed space (`pixel_values` as its
processor returns them, normalised around the processor's mean pixel), so every family works the same way:

- `blank`: every pixel of every image of the prompt becomes the processor's mean pixel (0 after its
  normalisation): nothing of the image is left;
- `patch`: a random `visual_mask_ratio` of the image's patches become the mean pixel (PAPO masks 60 %);
  a patch is one row of Qwen-VL's patch rows, else a `patch_size`² square of a [C, H, W] image;
- `noise`: every pixel is replaced by standard normal noise (the normaliser's mean and spread).

`patch` and `noise` draw from a generator seeded per prompt (`prompt_mask_seed`), never from the global RNG,
so a re-analysis draws the same masks and the training run's random stream is untouched. An image that
degrading leaves all zero gets 1e-6 everywhere instead: Idefics3 treats an all-zero image as batch padding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dapo_ops.models.inputs import VisionInputs

VISUAL_MASKS: tuple[str, ...] = ("blank", "patch", "noise")
# The value an image that degrading zeroed takes instead (Idefics3 drops all-zero images as padding).
_NOT_PADDING = 1e-6
# Rows of the [rows, V] logits per chunk of the KL, as `loss._CHUNK_ELEMENTS`: ~16 MiB of float32 temporaries.
_CHUNK_ELEMENTS = 1 << 22
# The per-rollout columns (attention.parquet, the round table) and the round metrics (`visual/<name>`).
ROLLOUT_COLUMNS: tuple[str, ...] = ("visual/kl_mean", "visual/kl_answer", "visual/dependent_token_ratio")


def prompt_mask_seed(seed: int, prompt: int) -> int:
    """The 31-bit seed of prompt `prompt`'s masks under the round's `seed` (the same for its G rollouts)."""
    digest = hashlib.sha256(f"{seed}/visual_mask/{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def vision_patch_size(model: Any, default: int = 14) -> int:
    """The vision tower's patch size from the model config (`vision_config.patch_size`), else `default`."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    size = getattr(vision, "patch_size", None)
    return int(size) if isinstance(size, int) and size > 0 else default


def _masked_count(total: int, ratio: float) -> int:
    return min(total, max(0, int(round(ratio * total))))


def _degrade_rows(image: torch.Tensor, mode: str, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """One image as patch rows [n, D] (Qwen-VL): each row is a patch."""
    if mode == "blank":
        return torch.zeros_like(image)
    if mode == "noise":
        return torch.randn(image.shape, generator=generator).to(image.dtype)
    out = image.clone()
    rows = torch.randperm(image.shape[0], generator=generator)[: _masked_count(image.shape[0], ratio)]
    out[rows] = 0
    return out


def _degrade_planes(image: torch.Tensor, mode: str, ratio: float, generator: torch.Generator,
                    patch_size: int) -> torch.Tensor:
    """One image as [C, H, W] (Idefics3, Gemma 3, LLaVA): patches are `patch_size`² squares."""
    if mode == "blank":
        return torch.zeros_like(image)
    if mode == "noise":
        return torch.randn(image.shape, generator=generator).to(image.dtype)
    height, width = int(image.shape[-2]), int(image.shape[-1])
    grid_h, grid_w = math.ceil(height / patch_size), math.ceil(width / patch_size)
    cells = torch.randperm(grid_h * grid_w, generator=generator)[: _masked_count(grid_h * grid_w, ratio)]
    keep = torch.ones(grid_h * grid_w, dtype=image.dtype)
    keep[cells] = 0
    # Each cell's 0/1 spread over its patch_size² pixels, cropped to the image.
    pixels = keep.reshape(grid_h, grid_w).repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
    return image * pixels[:height, :width]


def _images(item: torch.Tensor, grid: torch.Tensor | None) -> list[torch.Tensor]:
    """Views of one item's images: Qwen-VL's patch rows split per image by its grids, else [C, H, W] planes."""
    if item.ndim == 2:
        sizes = [int(item.shape[0])] if grid is None else grid.prod(-1).tolist()
        return list(torch.split(item, sizes, 0))
    if item.ndim < 3:
        raise ValueError(f"pixel_values items of shape {tuple(item.shape)} have no image layout to degrade")
    return list(item.reshape(-1, *item.shape[-3:]))


def degrade_item(item: torch.Tensor, grid: torch.Tensor | None, *, mode: str, ratio: float, seed: int,
                 patch_size: int) -> torch.Tensor:
    """One prompt's `pixel_values` with every image degraded (`mode`), masks drawn from `seed`."""
    if mode not in VISUAL_MASKS:
        raise ValueError(f"visual_mask={mode!r} is unknown; use one of {', '.join(VISUAL_MASKS)}")
    generator = torch.Generator().manual_seed(int(seed))
    out = []
    for image in _images(item, grid):
        if not bool(image.any()):  # batch padding (an all-zero image): left as it is
            out.append(image)
            continue
        if image.ndim == 2:
            degraded = _degrade_rows(image, mode, ratio, generator)
        else:
            degraded = _degrade_planes(image, mode, ratio, generator, patch_size)
        out.append(degraded if bool(degraded.any()) else torch.full_like(image, _NOT_PADDING))
    return torch.cat(out, 0) if item.ndim == 2 else torch.stack(out).reshape(item.shape)


def degrade_vision(vision: VisionInputs, seeds: Sequence[int], *, mode: str, ratio: float = 0.6,
                   patch_size: int = 14) -> VisionInputs:
    """`vision` with each item's images degraded, item i's masks drawn from `seeds[i]`. Only `pixel_values`
    changes: grids, pixel masks and the token layout stay, so the prompt tokens are those of the real image."""
    if "pixel_values" not in vision:
        raise ValueError(f"these image inputs have no pixel_values to degrade (keys: {', '.join(sorted(vision.tensors))})")
    if len(seeds) != len(vision):
        raise ValueError(f"{len(seeds)} seeds for {len(vision)} image items")
    counts = vision.counts["pixel_values"].tolist()
    items = torch.split(vision.tensors["pixel_values"], counts, 0)
    grids: list[torch.Tensor | None] = [None] * len(items)
    if "image_grid_thw" in vision:
        grids = list(torch.split(vision.tensors["image_grid_thw"], vision.counts["image_grid_thw"].tolist(), 0))
    parts = [degrade_item(item.cpu(), None if grid is None else grid.cpu(), mode=mode, ratio=ratio, seed=seed,
                          patch_size=patch_size)
             for item, grid, seed in zip(items, grids, seeds, strict=True)]
    pixel_values = torch.cat(parts, 0) if parts else vision.tensors["pixel_values"].cpu()
    tensors = {**vision.tensors, "pixel_values": pixel_values.to(vision.tensors["pixel_values"].device)}
    return VisionInputs(tensors, dict(vision.counts), vision.size)


def degraded_batch(batch: Any, *, mode: str, ratio: float, seed: int, patch_size: int = 14) -> Any:
    """A rollout or prompt batch (a dataclass with `vision`) whose images are degraded; rows of one prompt
    (`prompt_index`, else the row) get the same masks, so the shared-prefix forward still shares them."""
    vision = getattr(batch, "vision", None)
    if vision is None:
        raise ValueError(f"{type(batch).__name__} carries no `vision` image inputs to degrade")
    index = getattr(batch, "prompt_index", None)
    prompts = index.tolist() if index is not None else list(range(len(vision)))
    seeds = [prompt_mask_seed(seed, int(p)) for p in prompts]
    return dataclasses.replace(batch, vision=degrade_vision(vision, seeds, mode=mode, ratio=ratio,
                                                            patch_size=patch_size))


def token_kl(logits: torch.Tensor, masked_logits: torch.Tensor, *, temperature: float = 1.0,
             chunk_size: int | None = None) -> torch.Tensor:
    """KL(softmax(logits/T) ‖ softmax(masked_logits/T)) per position, in nats, float32: [..., V] -> [...].

    Computed over chunks of rows so that only one chunk's vocabulary-sized temporaries exist at a time.
    """
    if logits.shape != masked_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and masked_logits {tuple(masked_logits.shape)} differ")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    vocab = logits.shape[-1]
    flat, flat_masked = logits.reshape(-1, vocab), masked_logits.reshape(-1, vocab)
    rows = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, vocab))
    out = []
    for p_chunk, q_chunk in zip(flat.split(rows), flat_masked.split(rows), strict=True):
        log_p = F.log_softmax(p_chunk.float() / temperature, dim=-1)
        log_q = F.log_softmax(q_chunk.float() / temperature, dim=-1)
        # p·(log p − log q) is 0 where p = 0; the clamp keeps -inf logits from giving 0·(-inf) = NaN.
        floor = torch.finfo(log_p.dtype).min
        out.append((log_p.exp() * (log_p.clamp(min=floor) - log_q.clamp(min=floor))).sum(-1).clamp(min=0.0))
    result = torch.cat(out) if out else flat.new_zeros(0, dtype=torch.float32)
    return result.reshape(logits.shape[:-1])


def answer_token_mask(tokenizer: Any, completion_ids: torch.Tensor, lengths: Sequence[int],
                      marker: str = "</think>") -> torch.Tensor:
    """[N, Tc] bool: the completion tokens of the answer, the text after the last `marker` (as the rewards
    read it, `rewards.extract_choice`); the whole completion when it has no marker.

    A token belongs to the answer when it starts at or after the marker's end in the decoded text."""
    mask = torch.zeros(completion_ids.shape, dtype=torch.bool)
    for row, length in enumerate(int(n) for n in lengths):
        ids = completion_ids[row, :length].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=False)
        found = text.rfind(marker)
        if found < 0:
            mask[row, :length] = True
            continue
        end = found + len(marker)
        low, high = 0, length  # the fewest leading tokens whose text reaches `end`
        while low < high:
            middle = (low + high) // 2
            if len(tokenizer.decode(ids[: middle + 1], skip_special_tokens=False)) >= end:
                high = middle
            else:
                low = middle + 1
        mask[row, low + 1 : length] = True
    return mask


def rollout_visual_metrics(kl: torch.Tensor, completion_mask: torch.Tensor, answer_mask: torch.Tensor, *,
                           threshold: float) -> dict[str, list[float]]:
    """Per rollout: `visual/kl_mean` (mean KL over its completion tokens), `visual/kl_answer` (over its
    answer's tokens) and `visual/dependent_token_ratio` (share of completion tokens with KL > `threshold`:
    VPPO's pivotal tokens); NaN where a rollout has no such token."""
    tokens = completion_mask.bool()
    answer = answer_mask.bool() & tokens
    kl = kl.double()

    def mean(values: torch.Tensor, where: torch.Tensor) -> list[float]:
        count = where.sum(-1)
        total = torch.where(where, values, torch.zeros_like(values)).sum(-1)
        return [float(t / c) if c > 0 else math.nan for t, c in zip(total.tolist(), count.tolist(), strict=True)]

    return {
        "visual/kl_mean": mean(kl, tokens),
        "visual/kl_answer": mean(kl, answer),
        "visual/dependent_token_ratio": mean((kl > threshold).double(), tokens),
    }
