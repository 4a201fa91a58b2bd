"""Modality attention metrics (docs/metrics.md) and the teacher-forced pass that measures them.

Two ways to the same numbers:
- `metrics_from_attention_weights`: the readable oracle over full attention weights (eager attention,
  `output_attentions=True`): O(L·H·T²) memory, for tests and small checks only.
- The lean exact path: while `record_modality_mass` is active, the decoder's attention runs through
  `modality_mass_attention`, registered with transformers' `AttentionInterface`. It returns the ordinary
  SDPA output and, per decoder layer, runs ONE extra SDPA call over the query (completion) rows whose
  values are the two 0/1 key indicators (vision, text). The output is then exactly Σ_k A[h,q,k]·1[k∈V]
  (and likewise T) without ever materializing A: O(T) extra memory per layer.

Both reduce per-layer masses with `metrics_from_masses`, so the stage math exists once.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dapo_ops import progress, visual
from dapo_ops.config import STAGES
from dapo_ops.inputs import forward_position_ids, unwrapped, uses_rope_index
from dapo_ops.loss import entropy_from_logits, selective_log_softmax

# Per-rollout metrics of each stage: the measurements, then the balance derived from the MDI. Columns
# `attn/{stage}/{name}`, report blocks and `batch_means` use this order.
METRIC_NAMES: tuple[str, ...] = (
    "mdi",
    "aei_text",
    "aei_vision",
    "text_ratio",
    "vision_ratio",
    "mdi_balance",
    "mdi_penalty",
)
# The subset logged per round as `attention/{stage}/{name}` (in the round metrics' order).
LOGGED_METRIC_NAMES: tuple[str, ...] = ("mdi", "mdi_balance", "mdi_penalty", "aei_text", "aei_vision")
# The name under which the lean attention function (and its mask builder) is registered.
LEAN_ATTENTION = "dapo_modality_mass"

StageMetrics = dict[str, dict[str, float]]


# ----------------------------------------------------------------------------------------- stage math


def stage_layers(num_layers: int) -> dict[str, range]:
    """Decoder layers per stage: early [0, ⌊L/3⌋), middle [⌊L/3⌋, ⌊2L/3⌋), late [⌊2L/3⌋, L),
    all [0, L).

    With L < 3 some stages are empty (L=2: early; L=1: early and middle); their metrics are NaN.
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    a, b = num_layers // 3, (2 * num_layers) // 3
    return {
        "early": range(0, a),
        "middle": range(a, b),
        "late": range(b, num_layers),
        "all": range(num_layers),
    }


def _nan_metrics() -> dict[str, float]:
    return dict.fromkeys(METRIC_NAMES, math.nan)


def _stage_metrics(m_v: float, m_t: float, n_v: int, n_t: int, tolerance: float) -> dict[str, float]:
    """The docs/metrics.md definitions for one rollout and stage from the stage masses M_V, M_T and the key counts |V|, |T|."""
    if n_v <= 0 or n_t <= 0 or not (m_v + m_t > 0):  # also catches NaN masses
        # |V| = 0 is undefined by definition; |T| = 0 would make t = 0 and mdi 0/0: undefined as well.
        return _nan_metrics()
    text_ratio = m_t / (m_t + m_v)
    vision_ratio = m_v / (m_t + m_v)
    t_share = n_t / (n_t + n_v)
    v_share = n_v / (n_t + n_v)
    aei_text = text_ratio / t_share
    aei_vision = vision_ratio / v_share
    # = (M_T/|T|) / (M_V/|V|); a vision mass that underflowed to 0 gives inf (total text dominance).
    mdi = aei_text / aei_vision if aei_vision > 0 else math.inf
    log_mdi = abs(math.log(mdi)) if mdi > 0 else math.inf
    balance = min(max(1.0 - log_mdi / math.log(tolerance), 0.0), 1.0)
    return {
        "mdi": mdi,
        "aei_text": aei_text,
        "aei_vision": aei_vision,
        "mdi_balance": balance,
        "mdi_penalty": 1.0 - balance,
        "text_ratio": text_ratio,
        "vision_ratio": vision_ratio,
    }


def metrics_from_masses(
    vision_mass: torch.Tensor,
    text_mass: torch.Tensor,
    num_vision: torch.Tensor | Sequence[int],
    num_text: torch.Tensor | Sequence[int],
    *,
    tolerance: float = 2.0,
) -> list[StageMetrics]:
    """Per-rollout `{stage: {metric: value}}` from per-layer masses.

    vision_mass, text_mass: [B, L], m_V(l) and m_T(l) = mean over heads and query rows of the attention
    summed over the vision / text keys. num_vision, num_text: [B] key counts |V|, |T|.
    A rollout with |V| = 0 (or |T| = 0, or no query rows, i.e. NaN masses) gets NaN for every metric.
    """
    if not tolerance > 1.0:
        raise ValueError(f"mdi tolerance R must be > 1 (ln R divides), got {tolerance}")
    vision = torch.as_tensor(vision_mass).detach().to("cpu", torch.float64)
    text = torch.as_tensor(text_mass).detach().to("cpu", torch.float64)
    if vision.ndim != 2 or vision.shape != text.shape:
        raise ValueError(f"masses must both be [B, L], got {tuple(vision.shape)} and {tuple(text.shape)}")
    n_vision = torch.as_tensor(num_vision).reshape(-1).tolist()
    n_text = torch.as_tensor(num_text).reshape(-1).tolist()
    if not len(n_vision) == len(n_text) == vision.shape[0]:
        raise ValueError("num_vision / num_text must have one count per row of the masses")
    stages = stage_layers(vision.shape[1])
    # Stage means for all rollouts at once; an empty stage stays NaN.
    stage_means = {
        stage: (
            (
                vision[:, layers.start : layers.stop].mean(1).tolist(),
                text[:, layers.start : layers.stop].mean(1).tolist(),
            )
            if len(layers)
            else ([math.nan] * vision.shape[0], [math.nan] * vision.shape[0])
        )
        for stage, layers in stages.items()
    }
    results: list[StageMetrics] = []
    for b in range(vision.shape[0]):
        results.append(
            {
                stage: _stage_metrics(m_v[b], m_t[b], int(n_vision[b]), int(n_text[b]), tolerance)
                for stage, (m_v, m_t) in stage_means.items()
            }
        )
    return results


def masses_from_attention_weights(
    attentions: Sequence[torch.Tensor],
    query_mask: torch.Tensor,
    vision_mask: torch.Tensor,
    text_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's per-layer masses (m_V, m_T), each [B, L] float64, from full attention weights.

    m_V(l) = mean over heads h and query rows q of Σ_{k∈V} A[l, h, q, k]; NaN for a row without queries.
    """
    query = query_mask.detach().to("cpu").bool()
    vision = vision_mask.detach().to("cpu", torch.float64)
    text = text_mask.detach().to("cpu", torch.float64)
    num_queries = query.sum(-1)  # [B]; 0 queries -> 0/0 = NaN
    vision_per_layer, text_per_layer = [], []
    for weights in attentions:
        a = weights.detach().to("cpu", torch.float64)  # [B, H, Q, K]
        on_vision = (a * vision[:, None, None, :]).sum(-1).mean(1)  # [B, Q]: Σ_{k∈V} A, mean over heads
        on_text = (a * text[:, None, None, :]).sum(-1).mean(1)
        # `where`, not a product: rows that are not queries (e.g. fully masked padding) may hold NaN.
        vision_per_layer.append(torch.where(query, on_vision, 0.0).sum(-1) / num_queries)
        text_per_layer.append(torch.where(query, on_text, 0.0).sum(-1) / num_queries)
    return torch.stack(vision_per_layer, 1), torch.stack(text_per_layer, 1)


def metrics_from_attention_weights(
    attentions: Sequence[torch.Tensor],
    query_mask: torch.Tensor,
    vision_mask: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    tolerance: float = 2.0,
) -> list[StageMetrics]:
    """The oracle: docs/metrics.md straight from attention weights.

    attentions: per decoder layer [B, H, Q, K] (e.g. `output_attentions=True` with eager attention, where
    Q = K = the full sequence); query_mask [B, Q]; vision_mask, text_mask [B, K] (bool).
    Returns per sample `{stage: {mdi, aei_text, aei_vision, mdi_balance, mdi_penalty, text_ratio,
    vision_ratio}}` for early, middle, late, all; all NaN for a sample with no vision key or no query.
    """
    vision_mass, text_mass = masses_from_attention_weights(attentions, query_mask, vision_mask, text_mask)
    return metrics_from_masses(
        vision_mass, text_mass, vision_mask.sum(-1), text_mask.sum(-1), tolerance=tolerance
    )


# --------------------------------------------------------------------------------- the lean exact path


class ModalityMassRecorder:
    """Per-forward context of the lean path: which rows are queries, the key indicators, the accumulator.

    query_mask, vision_mask, text_mask: [B, T] bool over the full (prompt + completion) sequence that the
    forward will see. Only the window from the first query column to the end is attended again, so
    completions right after left-padded prompts cost Tc rows, not T.
    After the forward, `vision_mass` / `text_mass` [B, L] (float32, CPU) hold m_V(l), m_T(l); rows without
    query tokens, and layers the forward never reached, are NaN. With `differentiable`, they stay on the
    model's device with their autograd graph (when the forward runs with grad enabled).
    """

    def __init__(
        self, query_mask: torch.Tensor, vision_mask: torch.Tensor, text_mask: torch.Tensor, num_layers: int,
        *, differentiable: bool = False,
    ) -> None:
        if not query_mask.shape == vision_mask.shape == text_mask.shape or query_mask.ndim != 2:
            raise ValueError("query_mask, vision_mask and text_mask must all be [B, T]")
        self.batch_size, self.seq_len = (int(s) for s in query_mask.shape)
        self.num_layers = int(num_layers)
        # Masses that keep their graph to the queries and keys (the attention reward's pathwise gradient).
        self.differentiable = bool(differentiable)
        columns = query_mask.bool().any(0).nonzero()
        self.window_start = int(columns[0]) if len(columns) else self.seq_len
        self.query_rows = query_mask.bool()[:, self.window_start :]  # [B, Tq]
        self.num_queries = self.query_rows.sum(-1)  # [B]
        self.vision_mask = vision_mask.bool()
        self.text_mask = text_mask.bool()
        # [B, L, 2]: (vision, text), on the model's device (no per-layer sync). NaN: layer not measured.
        self._mass: torch.Tensor | None = None
        # Built lazily on the first layer (device, dtype and head size known there), reused by all layers.
        self._values: torch.Tensor | None = None
        self._row_weights: torch.Tensor | None = None
        self._mask_source: torch.Tensor | None = None
        self._mask_key: tuple[Any, ...] | None = None
        self._folded_mask: torch.Tensor | None = None
        self._pending: list[tuple[Any, ...]] = []

    @property
    def vision_mass(self) -> torch.Tensor:
        return self._masked(0)

    @property
    def text_mass(self) -> torch.Tensor:
        return self._masked(1)

    def _masked(self, channel: int) -> torch.Tensor:
        if self._mass is None:
            return torch.full((self.batch_size, self.num_layers), math.nan)
        mass = self._mass[:, :, channel]
        empty = (self.num_queries == 0).to(mass.device)[:, None]  # [B, 1]
        mass = torch.where(empty, torch.full_like(mass, math.nan), mass)  # out of place: keeps the graph
        return mass if self.differentiable else mass.detach().cpu()

    def release(self) -> None:
        """Drop the per-forward caches (the folded mask references the model's [B, 1, T, T] mask)."""
        self._values = self._row_weights = self._mask_source = self._folded_mask = None
        self._mask_key = None
        self._pending = []

    def _indicator_values(self, head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[B, 1, T, head_dim]: channel 0 = 1[k∈V], channel 1 = 1[k∈T], zeros elsewhere.

        Padded to the query head size because the fused SDPA kernels (flash on CPU, flash/efficient on CUDA)
        need equal q/k/v head sizes; with 2 channels SDPA falls back to the ~3x slower math kernel.
        """
        if self._values is None or self._values.shape[-1] != head_dim or self._values.dtype != dtype:
            values = torch.zeros(self.batch_size, 1, self.seq_len, head_dim, dtype=dtype, device=device)
            values[:, 0, :, 0] = self.vision_mask.to(device, dtype)
            values[:, 0, :, 1] = self.text_mask.to(device, dtype)
            self._values = values
            self._row_weights = None
        return self._values

    def _weights(self, num_heads: int, device: torch.device) -> torch.Tensor:
        """[B, Tq] so that Σ_{h,q} w·out = mean over heads and query rows."""
        if self._row_weights is None:
            rows = self.query_rows.to(device, torch.float32)
            self._row_weights = rows / (num_heads * self.num_queries.to(device).clamp(min=1))[:, None]
        return self._row_weights

    def _rows_mask(
        self, attention_mask: torch.Tensor | None, group: int, device: torch.device, offset: int = 0
    ) -> torch.Tensor:
        """The mask of the query window, with each row repeated `group` times (GQA fold, see `accumulate`).

        `offset`: the sequence position of the forward's first query row (> 0 after a cached prefix).
        The model builds one mask per forward and hands the same tensor to every layer, so the fold is
        computed once and reused (keyed on the tensor's identity, which it keeps during the forward).
        """
        key = (id(attention_mask), group, offset)
        if self._folded_mask is not None and self._mask_key == key and self._mask_source is attention_mask:
            return self._folded_mask
        start, seq = self.window_start, self.seq_len
        if attention_mask is None:
            # SDPA was told is_causal (or, after a cache, the rows see every key): query p sees keys k <= p.
            positions = torch.arange(start, seq, device=device)
            rows = (torch.arange(seq, device=device)[None, :] <= positions[:, None])[None, None]  # [1,1,Tq,T]
        else:
            rows = attention_mask[:, :, start - offset :, :]  # [B|1, 1|H, Tq, T], bool or additive float
        b, h, tq, t = rows.shape
        if h == 1:
            folded = rows[:, :, None].expand(b, 1, group, tq, t).reshape(b, 1, group * tq, t)
        else:  # a per-head mask: heads h = g*group + r share kv head g, as in `repeat_kv`
            folded = rows.reshape(b, h // group, group * tq, t)
        self._mask_source, self._mask_key, self._folded_mask = attention_mask, key, folded
        return folded

    def accumulate(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        """m_V(l), m_T(l) of one decoder layer from its query [B, H, Tq, D] and key [B, H_kv, T, D] states.

        Either one full forward (Tq = T) or, in the shared-prefix layout, a forward after a cached prompt:
        the queries are the last Tq positions and the keys the cached prompt plus those positions.
        """
        batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
        offset = self.seq_len - q_len  # the sequence position of query row 0
        if kv_len != self.seq_len or batch != self.batch_size or not 0 <= offset <= self.window_start:
            raise ValueError(
                "record_modality_mass expects one full forward over the recorded sequence, or one after a "
                "cached prefix whose queries include every query row "
                f"(B={self.batch_size}, T={self.seq_len}, first query "
                f"{self.window_start}); got query {tuple(query.shape)}, key {tuple(key.shape)} "
                "(a different batch, or a cache that does not hold the whole prefix?)"
            )
        if self.window_start >= self.seq_len:
            return
        # The query window: the rows from the first query column on.
        rows = query[:, :, self.window_start - offset :, :]
        if self.differentiable and torch.is_grad_enabled():
            # Deferred to `finish`, after the forward: inside a gradient-checkpointed layer, extra autograd ops
            # would break its recomputation (which runs plain SDPA); q and k themselves stay in the graph. The
            # window is copied (an op that saves nothing for the backward) so that the layer's full queries
            # can be freed.
            self._pending.append((layer_idx, rows.contiguous(), key, attention_mask, scaling, offset))
            return
        with torch.no_grad():
            self._accumulate(layer_idx, rows, key, attention_mask, scaling, offset)

    def finish(self) -> None:
        """Compute the deferred (differentiable) layers; a no-op for the no-grad path."""
        pending, self._pending = self._pending, []
        for args in pending:
            self._accumulate(*args)

    def _accumulate(
        self, layer_idx: int, rows: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
        scaling: float | None, offset: int,
    ) -> None:
        """One layer's masses from its query window rows [B, H, Tq, D] (`offset`: see `_rows_mask`)."""
        batch, heads, tq, head_dim = rows.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        # GQA without repeat_kv: query heads r of kv head g become extra query rows of g, so keys are shared.
        rows = rows.reshape(batch, kv_heads, group * tq, head_dim)
        values = self._indicator_values(head_dim, rows.dtype, rows.device).expand(batch, kv_heads, -1, -1)
        mask = self._rows_mask(attention_mask, group, rows.device, offset)
        out = F.scaled_dot_product_attention(rows, key, values, attn_mask=mask, scale=scaling)
        mass = out[..., :2].reshape(batch, heads, tq, 2).float()
        if self._mass is None:
            self._mass = torch.full((batch, self.num_layers, 2), math.nan, device=rows.device)
        # Σ over heads and weighted query rows: [B, 2] = mean over heads and the rollout's completion rows.
        self._mass[:, layer_idx, :] = torch.einsum("bhqc,bq->bc", mass, self._weights(heads, rows.device))


_ACTIVE: contextvars.ContextVar[ModalityMassRecorder | None] = contextvars.ContextVar(
    "dapo_modality_mass_recorder", default=None
)


def modality_mass_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, plus the modality masses of decoder layers while a recorder is active.

    A decoder self-attention is recognised by its `layer_idx` (vision-tower blocks have none) and causality;
    anything else, or no active recorder, is exactly `sdpa_attention_forward`.
    """
    output = sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )
    recorder = _ACTIVE.get()
    layer_idx = getattr(module, "layer_idx", None)
    if recorder is not None and layer_idx is not None and getattr(module, "is_causal", False):
        recorder.accumulate(int(layer_idx), query, key, attention_mask, scaling)
    return output


AttentionInterface.register(LEAN_ATTENTION, modality_mass_attention)
# Masks are built per implementation name: unknown names get NO mask at all (not even causal), so the
# lean path must build exactly the masks SDPA gets (None + is_causal when nothing is padded).
AttentionMaskInterface.register(LEAN_ATTENTION, sdpa_mask)


def _decoder_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The causal self-attention modules of the decoder (they carry `layer_idx`; vision blocks do not)."""
    return [
        m
        for m in model.modules()
        if getattr(m, "layer_idx", None) is not None
        and getattr(m, "is_causal", False)
        and hasattr(m, "config")
    ]


def decoder_num_layers(model: torch.nn.Module) -> int:
    """L: the number of decoder layers whose attention the lean path measures."""
    indices = [int(m.layer_idx) for m in _decoder_attention_modules(model)]
    if not indices:
        raise ValueError(f"{type(model).__name__} has no decoder attention with a layer_idx")
    return max(indices) + 1


_SWAP_LOCK = threading.Lock()
_SWAP_COUNTS: dict[int, int] = {}
_SWAP_PREVIOUS: dict[int, str | None] = {}


@contextmanager
def _lean_attention_on(configs: Sequence[Any]) -> Iterator[None]:
    """Point the decoder configs at the lean implementation; restore when the last user leaves.

    Only the decoder's (text) config changes, so the vision tower keeps its own implementation. The module
    reads `config._attn_implementation` on every call, so the swap takes effect for the next forward.
    """
    with _SWAP_LOCK:
        for config in configs:
            if _SWAP_COUNTS.get(id(config), 0) == 0:
                _SWAP_PREVIOUS[id(config)] = config._attn_implementation
                config._attn_implementation_internal = LEAN_ATTENTION
            _SWAP_COUNTS[id(config)] = _SWAP_COUNTS.get(id(config), 0) + 1
    try:
        yield
    finally:
        with _SWAP_LOCK:
            for config in configs:
                _SWAP_COUNTS[id(config)] -= 1
                if _SWAP_COUNTS[id(config)] == 0:
                    config._attn_implementation_internal = _SWAP_PREVIOUS.pop(id(config))
                    del _SWAP_COUNTS[id(config)]


@contextmanager
def record_modality_mass(
    model: torch.nn.Module,
    query_mask: torch.Tensor,
    vision_mask: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    differentiable: bool = False,
) -> Iterator[ModalityMassRecorder]:
    """Measure m_V(l), m_T(l) during ONE forward of `model` over [B, T] inputs (no KV cache).

    ```python
    with record_modality_mass(model, query_mask, vision_mask, text_mask) as rec:
        model(input_ids=..., attention_mask=..., ...)
    rec.vision_mass, rec.text_mass  # [B, L]
    ```
    Inside the block, the decoder uses SDPA (whatever it used before), so its outputs equal a plain SDPA
    forward. The recorder is bound to the current thread/context; a concurrent plain forward of the same
    model from another thread still gets plain SDPA outputs but no masses.
    """
    modules = _decoder_attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no decoder attention with a layer_idx")
    configs = list({id(m.config): m.config for m in modules}.values())
    recorder = ModalityMassRecorder(
        query_mask, vision_mask, text_mask, decoder_num_layers(model), differentiable=differentiable
    )
    with _lean_attention_on(configs):
        token = _ACTIVE.set(recorder)
        try:
            yield recorder
            recorder.finish()
        finally:
            _ACTIVE.reset(token)
            recorder.release()


@contextmanager
def recording_paused() -> Iterator[None]:
    """Forwards inside record nothing (the lean attention stays swapped in, so outputs stay SDPA's): the
    shared-prefix path's prompt forward, which has no query rows, runs inside the recorder this way."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# --------------------------------------------------------------------------------- teacher-forced pass


class RolloutLike(Protocol):
    """What the teacher-forced pass reads from a `dapo_ops.rollout.RolloutBatch` (attribute names)."""

    input_ids: torch.Tensor  # [N, Tp+Tc] prompt (left padded) + completion (right padded)
    attention_mask: torch.Tensor  # [N, Tp+Tc]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # [N, 3]
    vision_mask: torch.Tensor  # [N, Tp+Tc] bool, completion positions False
    text_mask: torch.Tensor  # [N, Tp+Tc] bool
    completion_ids: torch.Tensor  # [N, Tc]
    completion_mask: torch.Tensor  # [N, Tc]

    def select(self, indices: Sequence[int]) -> RolloutLike: ...


@dataclass
class TeacherForcedOutputs:
    """One teacher-forced pass over N rollouts (detached float32 tensors on the CPU).

    per_token_logps, entropy: [N, Tc], also at padded completion positions (mask them with
    `completion_mask`). vision_mass, text_mass: [N, L] m_V(l), m_T(l); None without attention.
    visual_kl: [N, Tc] per-token KL against the degraded images; None without the masked pass.
    """

    per_token_logps: torch.Tensor
    entropy: torch.Tensor
    vision_mass: torch.Tensor | None = None
    text_mass: torch.Tensor | None = None
    visual_kl: torch.Tensor | None = None


def _unwrap(model_or_policy: Any) -> torch.nn.Module:
    """A `models.Policy` holds the model in `.model`; an HF model's own `.model` is its inner trunk."""
    if isinstance(model_or_policy, torch.nn.Module):
        return model_or_policy
    return model_or_policy.model


def _legacy_model_inputs(model: torch.nn.Module, batch: Any) -> dict[str, Any]:
    """Qwen inputs from a batch that only carries ids, masks, `pixel_values` and `image_grid_thw`."""
    input_ids = batch.input_ids
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": batch.attention_mask}
    pixel_values = getattr(batch, "pixel_values", None)
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
        inputs["image_grid_thw"] = batch.image_grid_thw
    return inputs


def _model_inputs(model: torch.nn.Module, batch: RolloutLike, device: torch.device) -> dict[str, Any]:
    """The family's forward kwargs over prompt + completion, with the positions generation used."""
    model_inputs = getattr(batch, "model_inputs", None)
    raw = model_inputs() if callable(model_inputs) else _legacy_model_inputs(model, batch)
    inputs: dict[str, Any] = {k: v.to(device) for k, v in raw.items()}
    input_ids = inputs["input_ids"]
    if uses_rope_index(model) and "pixel_values" in inputs:
        # mm_token_type_ids makes Qwen2.5-VL use its 3D (mRoPE) positions, honouring left padding, exactly as
        # generation with the processor's inputs does; without them the forward falls back to 1D positions.
        mm_types = inputs.get("mm_token_type_ids")
        if mm_types is None:
            config = unwrapped(model).config
            mm_types = torch.zeros_like(input_ids, dtype=torch.int32)
            if getattr(config, "image_token_id", None) is not None:
                mm_types[input_ids == config.image_token_id] = 1
            if getattr(config, "video_token_id", None) is not None:
                mm_types[input_ids == config.video_token_id] = 2
        elif mm_types.shape[1] != input_ids.shape[1]:  # given for the prompt only: completions are text
            mm_types = torch.cat(
                [mm_types, mm_types.new_zeros(mm_types.shape[0], input_ids.shape[1] - mm_types.shape[1])], 1
            )
        inputs["mm_token_type_ids"] = mm_types
    positions = forward_position_ids(model, inputs)
    if positions is not None:
        inputs["position_ids"] = positions
    return inputs


def completion_forward(
    model: Any,
    rollouts_slice: RolloutLike,
    *,
    temperature: float = 1.0,
    with_attention: bool = False,
    entropy_grad: bool = False,
    attention_grad: bool = False,
    shared_prefix: bool = False,
    return_logits: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One forward over prompt + completion: (per_token_logps, entropy[, vision_mass, text_mass][, logits]).

    With `shared_prefix`, rows with the same prompt share one prompt forward (`dapo_ops.shared_prefix`):
    the same outputs up to float rounding.

    per_token_logps is differentiable (run it under `torch.no_grad()` for scoring), entropy only with
    `entropy_grad` (an entropy bonus); both are [B, Tc] on the model's device. Logits are computed only for the last Tc+1 positions
    (`logits_to_keep`) and divided by the sampling temperature, as in TRL (temperature <= 0, i.e. greedy
    sampling, scores the raw logits). With `with_attention`, also the [B, L] masses from the lean path: no
    gradient, on the CPU; with `attention_grad` as well, differentiable and on the model's device (the
    attention reward's pathwise term, `dapo_ops.update`). With `return_logits`, last the raw (unscaled)
    logits that score the completion tokens, [B, Tc, V] (the masked pass's KL, `dapo_ops.visual`).
    """
    if shared_prefix:
        from dapo_ops.shared_prefix import shared_completion_forward  # it imports this module

        return shared_completion_forward(
            model, rollouts_slice, temperature=temperature, with_attention=with_attention,
            entropy_grad=entropy_grad, attention_grad=attention_grad, return_logits=return_logits,
        )
    model = _unwrap(model)
    device = next(model.parameters()).device
    completion_ids = rollouts_slice.completion_ids.to(device)
    num_completion = int(completion_ids.shape[1])
    inputs = _model_inputs(model, rollouts_slice, device)
    seq_len = int(inputs["input_ids"].shape[1])

    recording: Any = nullcontext()
    if with_attention:
        query_mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool, device=device)
        query_mask[:, seq_len - num_completion :] = rollouts_slice.completion_mask.to(device).bool()
        recording = record_modality_mass(
            model, query_mask, rollouts_slice.vision_mask.to(device), rollouts_slice.text_mask.to(device),
            differentiable=attention_grad,
        )
    with recording as recorder:
        outputs = model(**inputs, use_cache=False, logits_to_keep=num_completion + 1)
    # Position p predicts token p+1: the Tc+1 kept rows score the Tc completion tokens, the last row none.
    logits = outputs.logits[:, :-1, :]
    scale = temperature if temperature > 0 else 1.0  # per chunk inside, no scaled copy of all logits
    per_token_logps = selective_log_softmax(logits, completion_ids, temperature=scale)
    # Usually logged only: no graph holding vocabulary-sized temporaries unless a bonus differentiates it.
    with nullcontext() if entropy_grad else torch.no_grad():
        entropy = entropy_from_logits(logits, temperature=scale)
    extra = (logits,) if return_logits else ()
    if not with_attention:
        return per_token_logps, entropy, *extra
    return per_token_logps, entropy, recorder.vision_mass, recorder.text_mass, *extra


@dataclass(frozen=True)
class VisualMasking:
    """The masked pass of `teacher_forced_pass` (`dapo_ops.visual`): how the images are degraded and the
    round's seed (each prompt's masks come from it and the prompt index)."""

    mode: str = "patch"
    ratio: float = 0.6
    seed: int = 0


def _masked_pass_kl(model: torch.nn.Module, batch: RolloutLike, logits: torch.Tensor, masking: VisualMasking, *,
                    temperature: float, shared_prefix: bool) -> torch.Tensor:
    """[B, Tc] KL(π(·|q, I) ‖ π(·|q, I_masked)) of one micro-batch, given its real-image `logits` [B, Tc, V]."""
    masked = visual.degraded_batch(batch, mode=masking.mode, ratio=masking.ratio, seed=masking.seed,
                                   patch_size=visual.vision_patch_size(unwrapped(model)))
    masked_logits = completion_forward(model, masked, temperature=temperature, shared_prefix=shared_prefix,
                                       return_logits=True)[-1]
    return visual.token_kl(logits, masked_logits, temperature=temperature if temperature > 0 else 1.0)


def teacher_forced_pass(
    model_or_policy: Any,
    rollouts: RolloutLike,
    *,
    temperature: float = 1.0,
    batch_size: int | None = None,
    with_attention: bool = True,
    shared_prefix: bool = True,
    visual_masking: VisualMasking | None = None,
) -> TeacherForcedOutputs:
    """Old per-token log-probs, entropy and per-layer modality masses of N rollouts from ONE forward each.

    Runs under `torch.no_grad()` in micro-batches of `batch_size` rollouts (all at once when None), through
    the same `completion_forward` that the update step differentiates; with `shared_prefix` (the default,
    `DapoConfig.shared_prefix`) each prompt of a micro-batch is computed once for all its rollouts. The
    model's train/eval mode is left as it is. With `visual_masking`, each micro-batch is scored a second
    time with its images degraded (the masked prompt shared per group as well) and `visual_kl` holds the
    per-token KL between the two (`dapo_ops.visual`); the masks come from their own seeded generators.
    """
    model = _unwrap(model_or_policy)
    total = int(rollouts.completion_ids.shape[0])
    step = total if not batch_size or batch_size >= total else int(batch_size)
    parts: list[tuple[torch.Tensor, ...]] = []
    progress.begin("teacher-forced", -(-total // max(step, 1)), unit="batch")
    with torch.no_grad():
        for start in range(0, total, max(step, 1)):
            stop = min(start + step, total)
            batch = rollouts if (start, stop) == (0, total) else rollouts.select(list(range(start, stop)))
            result = completion_forward(
                model, batch, temperature=temperature, with_attention=with_attention, shared_prefix=shared_prefix,
                return_logits=visual_masking is not None,
            )
            if visual_masking is not None:
                *result, logits = result
                result = (*result, _masked_pass_kl(model, batch, logits, visual_masking, temperature=temperature,
                                                   shared_prefix=shared_prefix))
                del logits
            parts.append(tuple(t.detach().float().cpu() for t in result))
            progress.advance("teacher-forced")
    if not parts:  # no rollouts
        width = int(rollouts.completion_ids.shape[1])
        empty = torch.zeros(0, width)
        layers = torch.zeros(0, decoder_num_layers(model)) if with_attention else None
        return TeacherForcedOutputs(empty, empty.clone(), layers, None if layers is None else layers.clone(),
                                    empty.clone() if visual_masking is not None else None)
    columns = [torch.cat(column, 0) for column in zip(*parts, strict=True)]
    visual_kl = columns.pop() if visual_masking is not None else None
    if with_attention:
        return TeacherForcedOutputs(*columns, visual_kl=visual_kl)
    return TeacherForcedOutputs(columns[0], columns[1], visual_kl=visual_kl)


def rollout_attention_metrics(
    outputs: TeacherForcedOutputs, rollouts: RolloutLike, *, tolerance: float = 2.0
) -> list[StageMetrics]:
    """Per-rollout `{stage: {metric: value}}` from a teacher-forced pass (NaN for rollouts without image)."""
    if outputs.vision_mass is None or outputs.text_mass is None:
        raise ValueError(
            "these outputs carry no attention masses (teacher_forced_pass(with_attention=False))"
        )
    return metrics_from_masses(
        outputs.vision_mass,
        outputs.text_mass,
        rollouts.vision_mask.sum(-1),
        rollouts.text_mask.sum(-1),
        tolerance=tolerance,
    )


def batch_means(per_rollout: Sequence[Mapping[str, Mapping[str, float]]]) -> StageMetrics:
    """`attention/{stage}/{name}` batch values: the mean over rollouts, NaN ones left out (NaN if all are)."""
    means: StageMetrics = {}
    for stage in STAGES:
        means[stage] = {}
        for name in METRIC_NAMES:
            values = [float(r[stage][name]) for r in per_rollout if not math.isnan(float(r[stage][name]))]
            means[stage][name] = sum(values) / len(values) if values else math.nan
    return means
