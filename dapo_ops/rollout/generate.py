"""Batched rollouts: G sampled completions per prompt with the KV cache, and the batch that carries them.

Rows are group-major: rollout i belongs to prompt i // G. Each prompt is prefilled once (vision tower
included) and its KV cache repeated G times; decoding then runs all N = P * G rows together.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from dapo_ops.common import progress
from dapo_ops.models.inputs import (
    ImageFields,
    PromptBatch,
    VisionInputs,
    prompt_position_ids,
    vl_model_inputs,
)
from dapo_ops.models.loading import Policy
from dapo_ops.rollout import kv_cache

_TENSOR_FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "completion_lengths",
    "is_eos",
    "prompt_index",
    "prompt_vision_mask",
    "prompt_text_mask",
)


@dataclass
class RolloutBatch(ImageFields):
    """N = P * G rollouts, group-major, with everything a teacher-forced pass over prompt+completion needs.

    `vision` holds the processor's image outputs once per rollout (any family's keys), so any row subset
    (`select`) is again a consistent model input; `save_rollout_batch` stores them once per prompt.
    """

    prompt_ids: torch.Tensor  # [N, Tp] long, left padded
    prompt_mask: torch.Tensor  # [N, Tp] long
    vision: VisionInputs  # one item per rollout
    completion_ids: torch.Tensor  # [N, Tc] long, pad after EOS
    completion_mask: torch.Tensor  # [N, Tc] long, 1 up to and including EOS
    completion_lengths: torch.Tensor  # [N] long, tokens incl. EOS
    is_eos: torch.Tensor  # [N] bool, the completion ended with EOS (else it was clipped)
    completions: list[str]  # decoded, special tokens skipped
    prompt_index: torch.Tensor  # [N] long, index of the prompt in the PromptBatch it was sampled from
    num_generations: int
    prompt_vision_mask: torch.Tensor  # [N, Tp] bool, image token positions
    prompt_text_mask: torch.Tensor  # [N, Tp] bool, text keys (docs/metrics.md)
    prompt_token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, Tp] each
    # Each per-token input's value over the completion (`inputs.completion_values`: PaliGemma's suffix 1).
    completion_values: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def prompt_length(self) -> int:
        """Tp: completion token j sits at column Tp + j of the concatenated sequence."""
        return int(self.prompt_ids.shape[1])

    @property
    def input_ids(self) -> torch.Tensor:
        """[N, Tp + Tc] prompt then completion (left padding before, padding after EOS)."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)

    def _pad_to_sequence(self, prompt_part: torch.Tensor) -> torch.Tensor:
        tail = torch.zeros(
            (len(self), self.completion_ids.shape[1]), dtype=torch.bool, device=prompt_part.device
        )
        return torch.cat([prompt_part.bool(), tail], dim=1)

    @property
    def vision_mask(self) -> torch.Tensor:
        """[N, Tp + Tc] bool: image token keys; completion positions are never keys."""
        return self._pad_to_sequence(self.prompt_vision_mask)

    @property
    def text_mask(self) -> torch.Tensor:
        """[N, Tp + Tc] bool: text keys; completion positions are never keys."""
        return self._pad_to_sequence(self.prompt_text_mask)

    @property
    def token_inputs(self) -> dict[str, torch.Tensor]:
        """The processor's per-token inputs over the prompt ([N, Tp]); `vl_model_inputs` extends them."""
        return self.prompt_token_inputs

    @property
    def mm_token_type_ids(self) -> torch.Tensor:
        """[N, Tp + Tc] 1 at image tokens: Qwen2.5-VL builds its 3D mRoPE positions from it."""
        return self.vision_mask.to(torch.int32)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the teacher-forced forward over prompt + completion.

        Passing `mm_token_type_ids` matters: without it Qwen2.5-VL falls back to 1D positions that
        ignore the left padding and the image grid, i.e. not the positions the rollout was sampled with.
        """
        return vl_model_inputs(self)

    def select(self, indices: Sequence[int] | torch.Tensor) -> RolloutBatch:
        """Rows `indices`, in that order (image inputs sliced per row)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        values: dict[str, Any] = {name: getattr(self, name)[idx.to(getattr(self, name).device)] for name in _TENSOR_FIELDS}
        return RolloutBatch(
            **values,
            vision=self.vision.select(idx),
            prompt_token_inputs={k: v[idx.to(v.device)] for k, v in self.prompt_token_inputs.items()},
            completions=[self.completions[i] for i in idx.tolist()],
            num_generations=self.num_generations,
            completion_values=dict(self.completion_values),
        )

    def to(self, device: str | torch.device) -> RolloutBatch:
        values = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        return RolloutBatch(
            **values,
            vision=self.vision.to(device),
            prompt_token_inputs={k: v.to(device) for k, v in self.prompt_token_inputs.items()},
            completions=list(self.completions),
            num_generations=self.num_generations,
            completion_values=dict(self.completion_values),
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, strings and ints (loadable with `torch.load(..., weights_only=True)`)."""
        state: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        state["completions"] = list(self.completions)
        state["vision"] = self.vision.state_dict()
        state["prompt_token_inputs"] = dict(self.prompt_token_inputs)
        state["completion_values"] = dict(self.completion_values)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RolloutBatch:
        values = {f.name: state[f.name] for f in fields(cls) if f.name in state}
        values["vision"] = VisionInputs.from_state_dict(state["vision"])
        return cls(**values)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def per_prompt_state(batch: RolloutBatch) -> dict[str, Any]:
    """`batch.state_dict()` with the image inputs kept once per prompt instead of once per rollout (G x
    smaller files): `prompt_rows` are the distinct prompt indices, `vision` their image inputs."""
    state = _to_cpu(batch.to("cpu").state_dict())
    prompt_index = batch.prompt_index.cpu()
    first = torch.unique(prompt_index, sorted=True)
    rows = torch.stack([torch.nonzero(prompt_index == p)[0, 0] for p in first.tolist()]) if len(first) else first
    state["vision"] = batch.vision.select(rows).to("cpu").state_dict()
    state["prompt_rows"] = first
    return state


def from_per_prompt_state(state: dict[str, Any]) -> RolloutBatch:
    """The inverse of `per_prompt_state`: each rollout gets its prompt's image inputs back."""
    state = dict(state)
    if "vision" not in state:  # written before image inputs were family-generic: Qwen patches + grids
        grids = state.pop("prompt_image_grid_thw", state["image_grid_thw"])
        state["vision"] = VisionInputs.from_patches(state.pop("pixel_values"), grids).state_dict()
        state.pop("image_grid_thw")
        state.setdefault("prompt_token_inputs", {"mm_token_type_ids": state["prompt_vision_mask"].long()})
    if "prompt_rows" in state:
        position = {p: i for i, p in enumerate(state.pop("prompt_rows").tolist())}
        owners = torch.tensor([position[p] for p in state["prompt_index"].tolist()], dtype=torch.long)
        state["vision"] = VisionInputs.from_state_dict(state["vision"]).select(owners).state_dict()
    return RolloutBatch.from_state_dict(state)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """`cache` in recent transformers 5.x, `past_key_values` before (the old name is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(outputs: Any) -> Any:
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


def prompt_seed(seed: int, prompt: int) -> int:
    """The 31-bit seed of prompt `prompt`'s group under the call's `seed`: a prompt's completions depend on
    its global index, not on which other prompts (or which process) share its batch."""
    digest = hashlib.sha256(f"{seed}/prompt/{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _multinomial(probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """[N] one draw per row of [N, V] `probs`; a sequence of k generators draws for k equal consecutive blocks
    of rows (one per prompt group), each from its own stream.

    `torch.multinomial` draws one sample per row as argmax(p / q) with q ~ Exp(1) from its generator (ATen's
    one-sample path), so per group only the noise is drawn (into `noise`, [N, V], reused across steps) and one
    batched divide + argmax picks every row: the same tokens as a `multinomial` call per group, without its
    per-call input checks (2.5 ms per step at 64 groups)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    noise = torch.empty_like(probs) if noise is None else noise
    for block, stream in zip(noise.view(len(generator), -1, probs.shape[-1]).unbind(0), generator, strict=True):
        block.exponential_(generator=stream)
    return (probs / noise).argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    suppressed: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row from [N, V] logits: suppressed ids masked, greedy when temperature == 0.
    `generator` may be one per group of rows (`_multinomial`, which may reuse the [N, V] buffer `noise`)."""
    logits = logits.float().clone()
    if suppressed is not None and suppressed.numel():
        logits[:, suppressed] = float("-inf")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return _multinomial(probs, generator, noise)


@dataclass
class _Prefilled:
    """A chunk's prompts after the prefill, expanded to their N = P * G decoding rows."""

    logits: torch.Tensor  # [N, V] next-token logits
    cache: Any  # the KV cache of the N rows (static: `kv_cache.preallocate`d, dynamic: repeated)
    buffers: kv_cache.DecodeBuffers | None  # static: the preallocated attention mask (and write position)
    attention_mask: torch.Tensor  # [N, Tp]
    next_position: torch.Tensor  # [N] position of the first completion token
    leading: tuple[int, ...]  # the position layout's leading axes: () for 1D, (3,) for mRoPE

    def step_positions(self, step: int) -> torch.Tensor:
        rows = self.next_position.shape[0]
        shape = (*([1] * len(self.leading)), rows, 1)
        return (self.next_position + step).view(shape).expand(*self.leading, rows, 1)


def _prefill(model: torch.nn.Module, prompts: PromptBatch, group: int, *, static_tokens: int | None,
             fixed: bool = False) -> _Prefilled:
    """One forward over each prompt (vision tower included), its cache expanded to the G rows of its group:
    preallocated with room for `static_tokens` more positions (`kv_cache.preallocate`; `fixed`: shape-static
    decoding steps, for CUDA graphs), or repeated (None)."""
    inputs = prompts.model_inputs()
    # The family's own positions (Qwen: text 1D, image tokens 3D over the grid; others 1D over attended
    # tokens), honouring left padding; the teacher-forced pass recomputes exactly these.
    position_ids = prompt_position_ids(model, inputs)
    outputs = model(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    cache = _output_cache(outputs)
    attention_mask = inputs["attention_mask"].repeat_interleave(group, dim=0)
    buffers = None
    if static_tokens is None:
        cache.batch_repeat_interleave(group)
    else:
        position = torch.full((1,), attention_mask.shape[1], device=attention_mask.device) if fixed else None
        kv_cache.preallocate(cache, group=group, extra_tokens=static_tokens, position=position)
        four_d = kv_cache.takes_4d_mask(model, cache)
        if fixed and not four_d:
            raise ValueError("a compiled decoder needs SDPA attention and no sliding-window layers (a 4D mask)")
        buffers = kv_cache.DecodeBuffers(attention_mask, static_tokens, four_d=four_d, position=position)
    # Next text position of each row: one past its largest prompt position (the image may span several).
    # position_ids is [B, T] or [k, B, T] (k = 3 mRoPE axes); decoding steps use the same layout.
    per_row = position_ids.reshape(-1, *position_ids.shape[-2:]).amax(dim=(0, 2))  # [B]
    return _Prefilled(logits=outputs.logits[:, -1].repeat_interleave(group, dim=0), cache=cache, buffers=buffers,
                      attention_mask=attention_mask,
                      next_position=(per_row + 1).repeat_interleave(group, dim=0),
                      leading=tuple(position_ids.shape[:-2]))


@torch.no_grad()
def _sample_chunk(
    policy: Policy,
    prompts: PromptBatch,
    *,
    num_generations: int,
    max_completion_length: int,
    temperature: float,
    top_p: float,
    generators: Sequence[torch.Generator] | None,
    suppressed: torch.Tensor,
    rollout_cache: str = "static",
    decoder: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [P*G, steps], lengths [P*G], is_eos [P*G]) for one chunk of prompts, group p sampled from
    `generators[p]` (None: greedy). `rollout_cache` "static": the KV cache and the attention mask are
    preallocated and written in place (`kv_cache`); "dynamic": both grow by concatenation at every step.
    `decoder` (static only): what runs the decoding forwards, shape-static (`kv_cache.compiled_decoder`)."""
    model = policy.model
    cache_kwarg = _cache_kwarg(model)
    static = rollout_cache == "static" or decoder is not None
    state = _prefill(model, prompts.trim_padding(), num_generations,
                     static_tokens=max_completion_length if static else None, fixed=decoder is not None)
    logits, cache, attention_mask, masks = state.logits, state.cache, state.attention_mask, state.buffers
    rows, device = logits.shape[0], logits.device
    noise = torch.empty_like(logits, dtype=torch.float32) if generators is not None else None
    eos, pad = policy.eos_token_id, policy.pad_token_id
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    tokens = torch.full((rows, max_completion_length), pad, dtype=torch.long, device=device)
    ones = torch.ones((rows, 1), dtype=attention_mask.dtype, device=device)
    for step in range(max_completion_length):
        token = sample_tokens(logits, temperature=temperature, top_p=top_p, generator=generators,
                              suppressed=suppressed, noise=noise)
        tokens[:, step] = token.masked_fill_(finished, pad)
        lengths += ~finished
        progress.advance("generation", (~finished).sum())
        finished |= token == eos
        if bool(finished.all()) or step == max_completion_length - 1:
            break
        attention_mask = masks.mask(step) if masks is not None else torch.cat([attention_mask, ones], dim=1)
        outputs = (model if decoder is None else decoder)(input_ids=token[:, None], attention_mask=attention_mask,
                                     position_ids=state.step_positions(step), use_cache=True, **{cache_kwarg: cache})
        cache = _output_cache(outputs)
        logits = outputs.logits[:, -1]
        if decoder is not None:
            masks.advance()
    return tokens[:, : step + 1], lengths, finished


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE symbols (Qwen's too): the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_OF = _byte_level_alphabet()


def _incomplete_tail(tokenizer: Any, ids: list[int]) -> bool:
    """Whether the bytes of `ids` end inside a UTF-8 character (byte-level BPE or `<0xNN>` byte tokens;
    False for a tokenizer whose tokens are not bytes)."""
    import codecs

    data = bytearray()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token in tokenizer.convert_ids_to_tokens([i for i in ids if i not in special]):
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            data.append(int(token[3:5], 16))
        elif all(c in _BYTE_OF for c in token):
            data.extend(_BYTE_OF[c] for c in token)
        else:
            return False
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(bytes(data), final=False)
    return bool(decoder.getstate()[0])


def decode_whole_characters(tokenizer: Any, ids: list[int]) -> str:
    """`ids` decoded (special tokens skipped) without a trailing partial character: a byte-level BPE token
    cut at max_completion_length can end in the middle of a UTF-8 character, which decodes to "\ufffd".
    The trailing tokens of that character (at most 3: a character has at most 4 bytes) are dropped."""
    cut = 0
    while cut < min(3, len(ids)) and _incomplete_tail(tokenizer, ids[: len(ids) - cut]):
        cut += 1
    return tokenizer.decode(ids[: len(ids) - cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _assemble(policy: Policy, prompts: PromptBatch, num_generations: int, token_chunks: list[torch.Tensor],
              length_chunks: list[torch.Tensor], eos_chunks: list[torch.Tensor]) -> RolloutBatch:
    """The chunks' sampled tokens as one group-major RolloutBatch on the CPU (completions padded after EOS)."""
    num_prompts = len(prompts)
    lengths = torch.cat(length_chunks)
    width = int(lengths.max())
    pad = policy.pad_token_id
    completion_ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    row = 0
    for tokens in token_chunks:
        take = min(width, tokens.shape[1])
        completion_ids[row : row + len(tokens), :take] = tokens[:, :take]
        row += len(tokens)
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
    completions = [decode_whole_characters(policy.tokenizer, ids[:n].tolist())
                   for ids, n in zip(completion_ids, lengths.tolist(), strict=True)]

    prompt_index = torch.arange(num_prompts).repeat_interleave(num_generations)
    return RolloutBatch(
        prompt_ids=prompts.input_ids.repeat_interleave(num_generations, dim=0).cpu(),
        prompt_mask=prompts.attention_mask.repeat_interleave(num_generations, dim=0).cpu(),
        vision=prompts.vision.to("cpu").select(prompt_index),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        completion_lengths=lengths,
        is_eos=torch.cat(eos_chunks),
        completions=completions,
        prompt_index=prompt_index,
        num_generations=num_generations,
        prompt_vision_mask=prompts.vision_mask.repeat_interleave(num_generations, dim=0).cpu(),
        prompt_text_mask=prompts.text_mask.repeat_interleave(num_generations, dim=0).cpu(),
        prompt_token_inputs={
            k: v.repeat_interleave(num_generations, dim=0).cpu() for k, v in prompts.token_inputs.items()
        },
        completion_values=dict(prompts.completion_values),
    )


def generate_rollouts(
    policy: Policy,
    prompts: PromptBatch,
    *,
    num_generations: int,
    max_completion_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    prompt_offset: int = 0,
    rollout_cache: str = "static",
    decoder: Any = None,
) -> RolloutBatch:
    """Sample `num_generations` completions per prompt (group-major) with the KV cache.

    Deterministic for a seed: prompt i's group draws from its own generator, seeded by
    `prompt_seed(seed, prompt_offset + i)`, so its completions are the same whatever `batch_size` and
    whichever prompts share the call (a rank given prompts [a, b) of a round passes `prompt_offset=a`).
    Decoding stays batched: one forward per step for all rows. Image/boundary tokens and padding are never sampled; a row
    stops at the family's end of turn (`<|im_end|>` for Qwen), which counts in its length and mask. `temperature=0` is greedy decoding.
    `batch_size` caps the rollouts decoded together (whole prompt groups; at least one group).
    `rollout_cache`: "static" preallocates the KV cache (`dapo_ops.kv_cache`), "dynamic" grows it by
    concatenation; both sample the same tokens. `decoder`: `kv_cache.compiled_decoder(policy.model)` runs the
    decoding steps compiled (CUDA graphs with mode="reduce-overhead"), on the static cache with a 4D mask.
    """
    if num_generations < 1 or max_completion_length < 1:
        raise ValueError("num_generations and max_completion_length must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature=} {top_p=}")
    if rollout_cache not in kv_cache.ROLLOUT_CACHES:
        raise ValueError(f"rollout_cache={rollout_cache!r} is unknown; use one of {', '.join(kv_cache.ROLLOUT_CACHES)}")
    model = policy.model
    was_training = model.training
    model.eval()
    device = policy.device
    num_prompts = len(prompts)
    generators = None if temperature == 0 else [
        torch.Generator(device=device).manual_seed(prompt_seed(seed, prompt_offset + i)) for i in range(num_prompts)]
    suppressed = torch.tensor(policy.suppressed_token_ids, dtype=torch.long, device=device)
    per_chunk = num_prompts if batch_size is None else max(1, batch_size // num_generations)
    progress.begin("generation", num_prompts * num_generations * max_completion_length, unit="tok")  # at most

    token_chunks: list[torch.Tensor] = []
    length_chunks: list[torch.Tensor] = []
    eos_chunks: list[torch.Tensor] = []
    try:
        for start in range(0, num_prompts, per_chunk):
            end = min(num_prompts, start + per_chunk)
            chunk = prompts.select(range(start, end)).to(device)
            tokens, lengths, is_eos = _sample_chunk(
                policy,
                chunk,
                num_generations=num_generations,
                max_completion_length=max_completion_length,
                temperature=temperature,
                top_p=top_p,
                generators=None if generators is None else generators[start:end],
                suppressed=suppressed,
                rollout_cache=rollout_cache,
                decoder=decoder,
            )
            token_chunks.append(tokens.cpu())
            length_chunks.append(lengths.cpu())
            eos_chunks.append(is_eos.cpu())
    finally:
        model.train(was_training)

    return _assemble(policy, prompts, num_generations, token_chunks, length_chunks, eos_chunks)
