"""Completions are decoded without a partial UTF-8 character at the end (a byte-level BPE cut mid-character)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: every UTF-8 byte is one token, "é" is two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_a_character_cut_in_the_middle_is_dropped(byte_tokenizer):
    from dapo_ops.rollout.generate import decode_whole_characters

    ids = byte_tokenizer.encode("café", add_special_tokens=False)
    assert len(ids) == 5  # c a f + the two bytes of é
    assert byte_tokenizer.decode(ids[:-1]).endswith("\ufffd")
    assert decode_whole_characters(byte_tokenizer, ids[:-1]) == "caf"
    assert decode_whole_characters(byte_tokenizer, ids) == "café"


def test_a_four_byte_character_cut_after_three_bytes_is_dropped(byte_tokenizer):
    from dapo_ops.rollout.generate import decode_whole_characters

    ids = byte_tokenizer.encode("ok🙂", add_special_tokens=False)
    assert decode_whole_characters(byte_tokenizer, ids[:-1]) == "ok"


def test_a_replacement_character_that_is_text_is_kept(byte_tokenizer):
    from dapo_ops.rollout.generate import decode_whole_characters

    ids = byte_tokenizer.encode("bad \ufffd", add_special_tokens=False)
    assert decode_whole_characters(byte_tokenizer, ids) == "bad \ufffd"
