"""Tokenizers: the checkpoint's own (transformers), or for presets a byte-level BPE with no
merges built with the `tokenizers` library (ids 0-255 are bytes, 256 is <|endoftext|>)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from engine.config import EngineConfig

EOS_TOKEN = "<|endoftext|>"
PRESET_TOKENIZER = "byte-level (preset)"  # how /v1/models names a preset's in-memory tokenizer


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


def tokenizer_source(config: EngineConfig) -> str:
    """Where the served tokenizer comes from: a directory or hub name, or PRESET_TOKENIZER."""
    from engine.config import PRESETS

    if config.tokenizer is not None:
        return config.tokenizer
    return PRESET_TOKENIZER if config.model in PRESETS else config.model


def save_tokenizer(config: EngineConfig, path: str | os.PathLike[str]) -> list[str]:
    """Write the tokenizer `config` serves to the directory `path` (created if needed), so that
    other tools load it with `AutoTokenizer.from_pretrained(path)` (GuideLLM's --processor,
    vLLM's --tokenizer ...). A preset's byte tokenizer exists only in memory: this is how
    it gets a name outside this process. Returns the files written."""
    from engine.config import PRESETS

    if config.skip_tokenizer_init:
        raise ValueError("skip_tokenizer_init=True: this configuration has no tokenizer to save")
    is_byte = config.tokenizer is None and config.model in PRESETS
    tok = load_tokenizer(config.model, config.tokenizer, config.model in PRESETS)
    tok.model_max_length = config.max_model_len  # what tools use to bound prompts
    os.makedirs(path, exist_ok=True)
    files = [str(f) for f in tok.save_pretrained(str(path))]
    if is_byte:  # transformers 5 names its class TokenizersBackend, which 4.x cannot load
        _set_tokenizer_class(os.path.join(path, "tokenizer_config.json"), "PreTrainedTokenizerFast")
    return files


def _set_tokenizer_class(config_path: str, name: str) -> None:
    with open(config_path) as f:
        data = json.load(f)
    data["tokenizer_class"] = name
    with open(config_path, "w") as f:
        json.dump(data, f, indent=2)
