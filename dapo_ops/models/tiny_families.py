"""Tiny offline checkpoints of the VLM families the pipeline supports, for tests, demos and benchmarks.

Each is built from its family's config class with small dimensions, a tokenizer trained locally with the
family's special tokens and chat template, and the family's real processor class, and can be saved with
`save_pretrained` (`save_tiny_family`) into a directory that `make run MODEL=<dir>` trains:

    python -m dapo_ops.models.tiny_families gemma3 /tmp/tiny-gemma3

Families: qwen2_vl, qwen2_5_vl (the embedded default), qwen3_vl, idefics3 (SmolVLM's architecture),
gemma3 (sliding-window layers, bidirectional attention among image tokens), llava (CLIP vision tower +
Llama decoder: a family the pipeline has no line of code for), paligemma (SigLIP tower + Gemma decoder, a
prefix-LM: the image and prompt attend both ways, the answer causally) and internvl (InternViT tower + Qwen2
decoder, `<img>`/`</img>` around the image tokens).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from dapo_ops.models import loading as models
from dapo_ops.models.loading import Policy, build_tokenizer
from dapo_ops.models.tokens import IM_END, IMAGE_PAD, PAD_TOKEN, VISION_END, VISION_START

# Text decoder shared by all: 4 layers (so every stage early/middle/late has one), GQA 4/2 heads.
HIDDEN = 64
LAYERS = 4
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
VOCAB = 512

# Gemma 3's chat template (system turn folded into the first user turn, `model` as the assistant role).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)
# SmolVLM's chat template (Idefics3 architecture).
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# LLaVA-1.5's conversation format.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{{ '\n' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% if message['role'] == 'assistant' %}</s>{% endif %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# PaliGemma's prompt layout ("<image>" * n, "<bos>", prompt, "\n", answer, "<eos>"): images first, then the texts;
# its processor inserts "<bos>" after the last image and "\n" at the end of the prompt.
PALIGEMMA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is not string %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '\n' }}"
    "{% elif not loop.first %}{{ '\n' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)
# InternVL3's (-hf) chat template: ChatML, an image item is "<IMG_CONTEXT>\n" (the processor expands it into
# "<img>" + image tokens + "</img>").
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _text_config(vocab_size: int, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 4096,
        **extra,
    }


def _mrope_section() -> list[int]:
    """mRoPE's (t, h, w) split of the head_dim / 2 rotary frequencies, in Qwen's 16/24/24 proportions."""
    rotary = HIDDEN // HEADS // 2
    temporal = rotary // 4
    height = (rotary - temporal) // 2
    return [temporal, height, rotary - temporal - height]


def _qwen_tokenizer(corpus: Iterable[str]) -> Any:
    return build_tokenizer(corpus, VOCAB)


def _ids(tokenizer: Any, *tokens: str) -> list[int]:
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def _finish(model: Any, processor: Any) -> Policy:
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = models.turn_end_token_id(tokenizer)
    model.eval()
    return Policy(model=model, processor=processor)


def build_qwen2_vl(corpus: Iterable[str], seed: int) -> Policy:
    tokenizer = _qwen_tokenizer(corpus)
    pad, eos, image, video, start, end = _ids(tokenizer, PAD_TOKEN, IM_END, IMAGE_PAD, "<|video_pad|>",
                                              VISION_START, VISION_END)
    config = Qwen2VLConfig(
        text_config=_text_config(
            len(tokenizer),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section()},
            pad_token_id=pad, eos_token_id=eos, bos_token_id=pad,
        ),
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": HIDDEN, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    processor = Qwen2VLProcessor(
        image_processor=models.build_image_processor(), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(), chat_template=tokenizer.chat_template,
    )
    return _finish(model, processor)


def build_qwen2_5_vl(corpus: Iterable[str], seed: int) -> Policy:
    return models.build_embedded_policy(corpus, seed=seed)


def build_qwen3_vl(corpus: Iterable[str], seed: int) -> Policy:
    tokenizer = _qwen_tokenizer(corpus)
    pad, eos, image, video, start, end = _ids(tokenizer, PAD_TOKEN, IM_END, IMAGE_PAD, "<|video_pad|>",
                                              VISION_START, VISION_END)
    config = Qwen3VLConfig(
        text_config=_text_config(
            len(tokenizer), head_dim=HIDDEN // HEADS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(),
                             "mrope_interleaved": True},
            pad_token_id=pad, eos_token_id=eos, bos_token_id=pad,
        ),
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": HIDDEN, "patch_size": 16, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
        tie_word_embeddings=True,
    )
    model = Qwen3VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    # 64x64 images -> 4x4 patches of 16 px -> 2x2 = 4 merged image tokens.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=64 * 64, max_pixels=64 * 64, patch_size=16, temporal_patch_size=2, merge_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16), chat_template=tokenizer.chat_template,
    )
    return _finish(model, processor)


def build_idefics3(corpus: Iterable[str], seed: int) -> Policy:
    specials = (PAD_TOKEN, "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>")
    tokenizer = build_tokenizer(
        corpus, VOCAB, special_tokens=specials, eos_token="<end_of_utterance>", pad_token=PAD_TOKEN,
        chat_template=IDEFICS3_CHAT_TEMPLATE, template_corpus=("User:", "Assistant:", "System:"),
    )
    pad, eos, image = _ids(tokenizer, PAD_TOKEN, "<end_of_utterance>", "<image>")
    # 32x32 images, 8 px patches -> 16 patches; pixel shuffle by 2 -> 4 image tokens.
    config = Idefics3Config(
        text_config={"model_type": "llama", **_text_config(len(tokenizer), pad_token_id=pad, eos_token_id=eos,
                                                           bos_token_id=pad)},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        scale_factor=2, image_token_id=image, pad_token_id=pad, tie_word_embeddings=True,
    )
    model = Idefics3ForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=IDEFICS3_CHAT_TEMPLATE)
    return _finish(model, processor)


def build_gemma3(corpus: Iterable[str], seed: int) -> Policy:
    specials = ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>")
    tokenizer = build_tokenizer(
        corpus, VOCAB, special_tokens=specials, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
        chat_template=GEMMA3_CHAT_TEMPLATE, template_corpus=("user\n", "model\n"),
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    pad, bos, eos, boi, eoi, image = _ids(tokenizer, "<pad>", "<bos>", "<eos>", "<start_of_image>",
                                          "<end_of_image>", "<image_soft_token>")
    # Sliding-window layers with a window shorter than prompt + completion (~70 tokens), so the sliding mask
    # really cuts keys (the system prompt, and the image for the last completion tokens), yet the image stays
    # in view of the first completion tokens (a window of a few tokens would make early-stage MDI infinite).
    config = Gemma3Config(
        text_config=_text_config(
            len(tokenizer), head_dim=HIDDEN // HEADS, sliding_window=40, query_pre_attn_scalar=HIDDEN // HEADS,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
        ),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi, image_token_index=image,
        tie_word_embeddings=True,
    )
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                chat_template=GEMMA3_CHAT_TEMPLATE)
    return _finish(model, processor)


def build_llava(corpus: Iterable[str], seed: int) -> Policy:
    specials = ("<pad>", "<s>", "</s>", "<image>")
    tokenizer = build_tokenizer(
        corpus, VOCAB, special_tokens=specials, eos_token="</s>", pad_token="<pad>", bos_token="<s>",
        chat_template=LLAVA_CHAT_TEMPLATE, template_corpus=("USER: ", "ASSISTANT:"),
    )
    pad, bos, eos, image = _ids(tokenizer, "<pad>", "<s>", "</s>", "<image>")
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                       "projection_dim": 32},
        text_config={"model_type": "llama", **_text_config(len(tokenizer), pad_token_id=pad, bos_token_id=bos,
                                                           eos_token_id=eos)},
        image_token_index=image, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # 32x32 / 8 px patches = 16 patch features (the CLS feature is dropped by the "default" strategy).
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    return _finish(model, processor)


def build_paligemma(corpus: Iterable[str], seed: int) -> Policy:
    specials = ("<pad>", "<bos>", "<eos>", "<image>")
    tokenizer = build_tokenizer(
        corpus, VOCAB, special_tokens=specials, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
        chat_template=PALIGEMMA_CHAT_TEMPLATE, extra_special_tokens={"image_token": "<image>"},
    )
    # 32x32 images, 8 px patches -> 16 image tokens.
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    # The processor adds PaliGemma's 1152 <locNNNN>/<segNNN> tokens: the vocabulary is sized after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=PALIGEMMA_CHAT_TEMPLATE)
    pad, bos, eos, image = _ids(tokenizer, "<pad>", "<bos>", "<eos>", "<image>")
    # The decoder attends both ways over the prefix (image + prompt) and causally over the suffix: PaliGemma's
    # config turns on `use_bidirectional_attention`, and token_type_ids (0 prefix, 1 suffix) draw the line.
    config = PaliGemmaConfig(
        text_config={"model_type": "gemma", **_text_config(len(tokenizer), head_dim=HIDDEN // HEADS,
                                                           pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        image_token_index=image, projection_dim=HIDDEN, hidden_size=HIDDEN, vocab_size=len(tokenizer),
        pad_token_id=pad, tie_word_embeddings=True,
    )
    model = PaliGemmaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return _finish(model, processor)


def build_internvl(corpus: Iterable[str], seed: int) -> Policy:
    specials = (PAD_TOKEN, "<|im_start|>", IM_END, "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    tokenizer = build_tokenizer(
        corpus, VOCAB, special_tokens=specials, eos_token=IM_END, pad_token=PAD_TOKEN,
        chat_template=INTERNVL_CHAT_TEMPLATE, template_corpus=("user\n", "assistant\n"),
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    pad, eos, image = _ids(tokenizer, PAD_TOKEN, IM_END, "<IMG_CONTEXT>")
    # 32x32 images, 8 px patches -> 16 patches; pixel shuffle by 0.5 -> 4 image tokens, one tile per image.
    config = InternVLConfig(
        text_config={"model_type": "qwen2", **_text_config(len(tokenizer), pad_token_id=pad, eos_token_id=eos,
                                                           bos_token_id=pad)},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": [32, 32], "patch_size": [8, 8]},
        image_token_id=image, image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=True,
    )
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False,
                                               min_patches=1, max_patches=1)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=4,
                                  chat_template=INTERNVL_CHAT_TEMPLATE)
    return _finish(model, processor)


BUILDERS: dict[str, Callable[[Iterable[str], int], Policy]] = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "idefics3": build_idefics3,
    "gemma3": build_gemma3,
    "llava": build_llava,
    "paligemma": build_paligemma,
    "internvl": build_internvl,
}
# The families named in docs/models.md's table; llava stands for "a family the code does not name".
NAMED_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "gemma3")


def build_tiny_family(family: str, corpus: Iterable[str], seed: int = 0) -> Policy:
    """A randomly initialised (from `seed`) tiny policy of `family` with a tokenizer trained on `corpus`."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(BUILDERS)}")
    corpus = list(corpus)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[family](corpus, seed)


def save_tiny_family(family: str, path: str | Path, corpus: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Build `family` (tokenizer trained on `corpus`, the embedded data set's texts by default) and save it
    with `save_pretrained` (model + processor) into `path`."""
    if corpus is None:
        from dapo_ops.data import synthetic

        corpus = list(synthetic.corpus())
    return models.save_policy(build_tiny_family(family, corpus, seed), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(BUILDERS))
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_tiny_family(args.family, args.path, seed=args.seed))


if __name__ == "__main__":
    main()
