"""A preallocated KV cache for rollouts: written in place at each decoding step instead of grown by concatenation.

The prompt is prefilled once per group into transformers' `DynamicCache` (P rows); `preallocate` then swaps
each full-attention layer for a `PreallocatedLayer` holding [P*G, H, Tp + max_new, D] buffers, into which the
prompt's keys and values are broadcast to the G rows of their group (one write, no repeated copy), and each
decoding step writes its one new position in place. A layer returns views of its filled part, so attention
reads exactly the keys the growing cache would have held, in the same order: the logits, hence the sampled
tokens, are the same as `DynamicCache`'s (tests/test_rollout.py compares both token for token). What goes
away is the per-step `torch.cat` of every layer's whole cache (a fresh allocation that grows every step; on
the CPU large ones are fresh pages, page faults included: ~30 % of generation time at the realistic shape).

The shape-static variant for CUDA graphs / `torch.compile` (`compiled_decoder`): `update` writes at a position
held in a device tensor (`DecodeBuffers.position`) and returns the whole buffers, which a 4D boolean attention
mask (`DecodeBuffers.mask`, False past the written part; transformers passes a 4D mask through unchanged)
limits to the filled positions. Every decoding step then has the same shapes and the same tensor addresses.

Sliding-window layers (Gemma 3) keep transformers' own dynamic layer (repeated to G rows): their cache is
a window, not a prefix, and stays small.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

# `DapoConfig.rollout_cache`'s values (config.ROLLOUT_CACHES, which stays free of torch).
ROLLOUT_CACHES: tuple[str, ...] = ("dynamic", "static")


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers of a fixed capacity, written in place.

    Subclasses `DynamicLayer` so that a `DynamicCache` holding it behaves as before for everything but growth
    (transformers checks layer types and reads `is_sliding`, `keys`, `get_seq_length`)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, *,
                 position: torch.Tensor | None = None) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer = keys, values  # [N, H, capacity, D]
        self.length = length
        self.position = position  # fixed mode: the write position, a device tensor shared by all layers
        self.device = keys.device
        self.is_initialized = True
        self._expose()
        if position is not None:  # CUDA graphs replay in-place writes only to tensors at fixed addresses
            for tensor in (keys, values, position):
                torch._dynamo.mark_static_address(tensor)

    @property
    def capacity(self) -> int:
        return int(self.key_buffer.shape[-2])

    def _expose(self) -> None:
        if self.position is None:
            self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]
        else:
            self.keys, self.values = self.key_buffer, self.value_buffer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None  # allocated at construction

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self.position is not None:  # shape-static: the write position is data, not a Python int
            index = self.position + torch.arange(new, device=self.device)
            self.key_buffer.index_copy_(2, index, key_states)
            self.value_buffer.index_copy_(2, index, value_states)
            return self.keys, self.values
        end = self.length + new
        if end > self.capacity:
            raise RuntimeError(f"the preallocated KV cache holds {self.capacity} positions; writing {new} at "
                               f"{self.length} overflows it (max_completion_length too small for the buffer?)")
        self.key_buffer[:, :, self.length : end].copy_(key_states)
        self.value_buffer[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self, *args: Any, **kwargs: Any) -> Any:
        return self.length if self.position is None else self.position[0]

    def get_mask_sizes(self, query_length: Any = 1, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """(kv_length, kv_offset); `query_length` an int (transformers >= 5.2x) or the cache positions."""
        new = int(query_length.shape[0]) if isinstance(query_length, torch.Tensor) else int(query_length)
        return (self.capacity if self.position is not None else self.length + new), 0

    def get_max_length(self) -> int:
        return self.capacity

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise RuntimeError("a PreallocatedLayer is already expanded to its rows")


def preallocate(cache: Any, *, group: int, extra_tokens: int, position: torch.Tensor | None = None) -> Any:
    """Turn the prefilled `cache` (P rows) into one of P * `group` rows with room for `extra_tokens` more
    positions, in place; returns it. Row r of the result is row r // group of the prompt cache (group-major,
    as `DynamicCache.batch_repeat_interleave`)."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.numel() == 0:
            layer.batch_repeat_interleave(group)  # sliding-window (or unused) layers stay dynamic
            continue
        keys, values = layer.keys, layer.values  # [P, H, Tp, D]
        prompts, heads, length, _ = keys.shape
        buffers = []
        for source in (keys, values):
            buffer = source.new_zeros(prompts * group, heads, length + extra_tokens, source.shape[-1])
            # Broadcast each prompt row to its group's G rows: one write, no intermediate repeated tensor.
            buffer.view(prompts, group, heads, -1, source.shape[-1])[:, :, :, :length].copy_(source[:, None])
            buffers.append(buffer)
        cache.layers[index] = PreallocatedLayer(*buffers, length, position=position)
    return cache


def takes_4d_mask(model: torch.nn.Module, cache: Any) -> bool:
    """Whether decoding steps may pass a ready 4D boolean mask (transformers passes one through unchanged): SDPA
    attention (eager adds the mask, so it must be additive) and every layer preallocated (a sliding-window layer
    needs its own mask)."""
    attention = getattr(model.config.get_text_config(), "_attn_implementation", None)
    return attention == "sdpa" and all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)


class DecodeBuffers:
    """The attention mask of a decoding batch, preallocated over Tp + extra columns: the prompt's mask, then the
    completion positions.

    `mask(step)` is the mask of decoding step `step` (0: the forward that feeds the first sampled token): a view
    of its first Tp + step + 1 columns, [N, Tp + step + 1] (or, `four_d`, a [N, 1, 1, ...] boolean view, which
    spares transformers building the mask at every step). With `position` (the cache's write position, a
    one-element device tensor that `advance` moves; shape-static decoding) it is the whole [N, 1, 1, Tp + extra]
    boolean buffer, False where nothing is written yet."""

    def __init__(self, prompt_mask: torch.Tensor, extra_tokens: int, *, four_d: bool = False,
                 position: torch.Tensor | None = None) -> None:
        rows, self.prompt_length = prompt_mask.shape
        self.position = position
        self.fixed = position is not None
        if self.fixed or four_d:
            self.buffer = torch.ones(rows, 1, 1, self.prompt_length + extra_tokens, dtype=torch.bool,
                                     device=prompt_mask.device)
            self.buffer[:, 0, 0, : self.prompt_length] = prompt_mask.bool()
        else:
            self.buffer = prompt_mask.new_ones(rows, self.prompt_length + extra_tokens)
            self.buffer[:, : self.prompt_length] = prompt_mask
        if self.fixed:
            self.buffer[..., self.prompt_length :] = False
            torch._dynamo.mark_static_address(self.buffer)

    def mask(self, step: int) -> torch.Tensor:
        end = self.prompt_length + step + 1
        if not self.fixed:
            return self.buffer[..., :end]
        self.buffer[..., end - 1] = True
        return self.buffer

    def advance(self) -> None:
        self.position.add_(1)


def compiled_decoder(model: torch.nn.Module, *, backend: str = "inductor", mode: str | None = None) -> Any:
    """`model` compiled for the shape-static decoding steps of `generate_rollouts(..., decoder=...)`; keep it
    and pass it to every call (compiling happens at its first step).

    `mode="reduce-overhead"` (inductor on CUDA) replays each step as a CUDA graph. The steps of one generation
    share every shape and address, so it is captured once; another batch size or length compiles again."""
    return torch.compile(model, backend=backend, mode=mode, dynamic=False)


def decode_read_bytes(model: torch.nn.Module, rows: int, prompt_length: int, steps: int) -> tuple[list[int], int]:
    """Bytes each of `steps` decoding forwards of `rows` rows reads at least: the text decoder's and the LM head's
    weights (the embedding table is gathered row by row, not read whole; the vision tower does not run) and every
    layer's keys and values so far (prompt_length + step + 1 positions). Returns (per step, weight bytes)."""
    text = model.config.get_text_config()
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    skip = {id(p) for p in embeddings.parameters()} - {id(p) for p in head.parameters()}  # tied: read once
    vision = getattr(getattr(model, "model", model), "visual", None) or getattr(model, "vision_tower", None)
    skip |= {id(p) for p in vision.parameters()} if vision is not None else set()
    projector = getattr(getattr(model, "model", model), "multi_modal_projector", None)
    skip |= {id(p) for p in projector.parameters()} if projector is not None else set()
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    per_position = 2 * text.num_hidden_layers * rows * text.num_key_value_heads * head_dim * itemsize
    return [weights + per_position * (prompt_length + s + 1) for s in range(steps)], weights
