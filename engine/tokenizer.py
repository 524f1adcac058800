"""Tokenizers: the checkpoint's own (transformers), or for presets a byte-level BPE with no
merges built with the `tokenizers` library (ids 0-255 are bytes, 256 is <|endoftext|>)."""

from __future__ import annotations

import os

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


# what transformers reads a tokenizer from; a checkpoint with none of them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")
NO_TOKENIZER_HINT = ("pass tokenizer=<a directory or hub name> (--tokenizer), or skip_tokenizer_init=True "
                     "(--skip-tokenizer-init: token-id prompts only, no stop strings, no output text)")


def load_tokenizer(model: str, tokenizer: str | None, is_preset: bool) -> PreTrainedTokenizerBase:
    if tokenizer is None and is_preset:
        return build_byte_tokenizer()
    source = tokenizer or model
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); {NO_TOKENIZER_HINT}")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers' own errors do not say which directory, nor what to do
        raise ValueError(f"{source}: the tokenizer could not be loaded ({type(exc).__name__}: {exc}); "
                         f"{NO_TOKENIZER_HINT}") from exc
