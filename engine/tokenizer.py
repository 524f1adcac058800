"""Tokenizers: the checkpoint's own (transformers), or for presets a byte-level BPE with no
merges built with the `tokenizers` library (ids 0-255 are bytes, 256 is <|endoftext|>)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def load_tokenizer(model: str, tokenizer: str | None, is_preset: bool) -> PreTrainedTokenizerBase:
    if tokenizer is None and is_preset:
        return build_byte_tokenizer()
    return AutoTokenizer.from_pretrained(tokenizer or model)
