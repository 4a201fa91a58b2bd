"""The lean exact path to modality masses: while `record_modality_mass` is active, the decoder's attention runs
through `modality_mass_attention`, registered with transformers' `AttentionInterface`. It returns the ordinary
SDPA output and, per decoder layer, runs ONE extra SDPA call over the query (completion) rows whose values are
the two 0/1 key indicators (vision, text): exactly Σ_k A[h,q,k]·1[k∈V] (and likewise T) without ever
materializing A, O(T) extra memory per layer.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dapo_ops.models.inputs import unwrapped

# The name under which the lean attention function (and its mask builder) is registered.
LEAN_ATTENTION = "dapo_modality_mass"




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
        # ids of the decoder attention modules to measure (`record_modality_mass` fills it).
        self.modules: set[int] = set()

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
        self, attention_mask: torch.Tensor | None, group: int, device: torch.device, offset: int = 0,
        causal: bool = True,
    ) -> torch.Tensor:
        """The mask of the query window, with each row repeated `group` times (GQA fold, see `accumulate`).

        `offset`: the sequence position of the forward's first query row (> 0 after a cached prefix).
        `causal`: what SDPA does without a mask (a prefix-LM decoder's rows then see every key).
        The model builds one mask per forward and hands the same tensor to every layer, so the fold is
        computed once and reused (keyed on the tensor's identity, which it keeps during the forward).
        """
        key = (id(attention_mask), group, offset, causal)
        if self._folded_mask is not None and self._mask_key == key and self._mask_source is attention_mask:
            return self._folded_mask
        start, seq = self.window_start, self.seq_len
        if attention_mask is None:
            # SDPA was told is_causal (or, after a cache, the rows see every key): query p sees keys k <= p.
            positions = torch.arange(start, seq, device=device)
            rows = (torch.arange(seq, device=device)[None, :] <= positions[:, None])[None, None]  # [1,1,Tq,T]
            if not causal:
                rows = torch.ones_like(rows)
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
        *,
        causal: bool = True,
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
            self._pending.append((layer_idx, rows.contiguous(), key, attention_mask, scaling, offset, causal))
            return
        with torch.no_grad():
            self._accumulate(layer_idx, rows, key, attention_mask, scaling, offset, causal)

    def finish(self) -> None:
        """Compute the deferred (differentiable) layers; a no-op for the no-grad path."""
        pending, self._pending = self._pending, []
        for args in pending:
            self._accumulate(*args)

    def _accumulate(
        self, layer_idx: int, rows: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
        scaling: float | None, offset: int, causal: bool = True,
    ) -> None:
        """One layer's masses from its query window rows [B, H, Tq, D] (`offset`: see `_rows_mask`)."""
        batch, heads, tq, head_dim = rows.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        # GQA without repeat_kv: query heads r of kv head g become extra query rows of g, so keys are shared.
        rows = rows.reshape(batch, kv_heads, group * tq, head_dim)
        values = self._indicator_values(head_dim, rows.dtype, rows.device).expand(batch, kv_heads, -1, -1)
        mask = self._rows_mask(attention_mask, group, rows.device, offset, causal)
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

    The recorder measures the decoder self-attention modules it was given (`_decoder_attention_modules`: causal
    or prefix-LM); anything else, or no active recorder, is exactly `sdpa_attention_forward`.
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
    if recorder is not None and id(module) in recorder.modules:
        # What SDPA was told when the model gave no mask: causal iff the module is (a prefix-LM's is not).
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        recorder.accumulate(int(module.layer_idx), query, key, attention_mask, scaling, causal=causal)
    return output


AttentionInterface.register(LEAN_ATTENTION, modality_mass_attention)
# Masks are built per implementation name: unknown names get NO mask at all (not even causal), so the
# lean path must build exactly the masks SDPA gets (None + is_causal when nothing is padded).
AttentionMaskInterface.register(LEAN_ATTENTION, sdpa_mask)


def _model_type(config: Any) -> str | None:
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    return getattr(text, "model_type", None)


def _decoder_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of the decoder, causal or prefix-LM (PaliGemma's Gemma decoder has
    `is_causal=False`: its mask draws the prefix/suffix line). They carry a `layer_idx` and the text config;
    vision-tower blocks carry no `layer_idx`, or their own (vision) config."""
    candidates = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None and hasattr(m, "config")]
    root = getattr(unwrapped(model), "config", None)
    text_type = None if root is None else _model_type(root)
    decoder = [m for m in candidates if text_type is not None and _model_type(m.config) == text_type]
    # A decoder whose modules hold some other config: fall back to the causal ones (what vision towers are not).
    return decoder or [m for m in candidates if getattr(m, "is_causal", False)]


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
    recorder.modules = {id(m) for m in modules}
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
