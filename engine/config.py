"""Configuration: the engine knobs (`EngineConfig`). The model's shape (`ModelConfig`) and the
presets live with the models (engine/models/config.py) and are re-exported here.

Every user-facing value is validated in `__post_init__`, and the values that depend on the
machine or the model argument ("auto" device and dtype, preset or checkpoint) are resolved there
once; everything else reads the resolved values from the config.

The lists of choices belong to their registries (engine.attention.BACKENDS, engine.dtypes.DTYPES and
KV_CACHE_DTYPES;
ModelConfig checks architectures against engine.models.ARCHITECTURES); only names are imported."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from engine.attention import BACKENDS, check_backend
from engine.dtypes import DTYPES, KV_CACHE_DTYPES, dtype_name
from engine.models.config import PRESETS, ModelConfig  # also imported from here by callers

# Python's spellings of JSON's literals, as --kernel-constant takes them: without them
# `--engine-arg enforce_eager=True` gave the string 'True'
PYTHON_LITERALS = {"True": True, "False": False, "None": None}


def parse_value(text: str) -> Any:
    """JSON if it parses (1, 0.5, true, [1,2], "x"), True / False / None, else a float (inf),
    else the string."""
    if text.strip() in PYTHON_LITERALS:
        return PYTHON_LITERALS[text.strip()]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


ATTENTION_BACKENDS = ("auto", *BACKENDS)  # auto: triton on CUDA, torch on CPU
SCHEDULING_POLICIES = ("continuous", "static")
# What a static batch reserves per request up front: prompt + max_tokens (its own maximum), or
# max_model_len (the server's maximum, as when output lengths are unknown: the PagedAttention
# paper's "Orca (Max)" regime).
STATIC_RESERVATIONS = ("max_tokens", "max_model_len")
# "barrier": ranks meet at a barrier, then load each other's partial sums; "push": for decode
# batches (up to 128 rows) each rank stores its partials into its peers' memory, the data is the
# flag, and larger steps use the barrier; "off": an all-reduce, then the RMSNorm kernel
ALL_REDUCE_NORM_FUSIONS = ("barrier", "push", "off")
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: bfloat16 on CUDA, float32 on CPU
KV_CACHE_DTYPE_CHOICES = ("auto", *KV_CACHE_DTYPES)  # auto: the model's dtype
LOAD_FORMATS = ("dummy", "checkpoint")  # a preset name: random weights; a directory: its safetensors


@dataclass
class EngineConfig:
    """All engine knobs. `model` is a preset name or a local HF checkpoint directory."""

    model: str = "tiny"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    # KV cache storage: auto = the model's dtype; fp8 (= fp8_e4m3) or fp8_e5m2 store K and V in 8 bits
    # (per-tensor scales 1.0, as vLLM without calibrated scales): twice the blocks in the same memory
    kv_cache_dtype: str = "auto"
    device: str = "auto"  # auto: cuda if available
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None  # override the computed KV capacity (tests, static-vs-continuous at equal memory)
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_bytes: int = 256 << 20
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: min(model max positions, 8192)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "continuous"
    static_reservation: str = "max_tokens"  # static policy only: see STATIC_RESERVATIONS
    attention_backend: str = "auto"
    enforce_eager: bool = False
    # CUDA graphs also for steps with prefill tokens (prefill chunks, prefix hits, mixed steps) of
    # up to this many tokens, padded to a ladder 16, 32, 48, 64, 96, ...; 0: those run eagerly
    max_graph_prefill_tokens: int = 512
    # GPU, TP=1: steps of up to this many tokens run each projection as one skinny-GEMM kernel with
    # the RMSNorm before it and SiLU * up after it fused in (engine/kernels/skinny_gemm.py); 0: cuBLAS.
    # None: where it measured faster (FUSED_AUTO_MAX_HIDDEN)
    fused_small_batch_tokens: int | None = None
    # those kernels launch as programmatic dependents (sm_90+; ignored before): each starts loading its
    # weights while the kernel before it finishes (qwen3-0.6b batch 1 on an H200: 0.908 vs 0.986 ms a
    # step, reports/PERF.md row 22)
    fused_small_batch_pdl: bool = True
    # decode steps on the fused path: the decode attention kernel applies the q/k norm and rotary to the
    # raw q and k and stores this step's K/V itself (no qk_norm_rope kernel: one kernel fewer a layer)
    fused_small_batch_rotary: bool = True
    # decode steps on the fused path: the decode attention kernel merges its KV splits itself, in the last
    # program of each KV head to finish (no reduce kernel: one kernel fewer a layer; with _rotary, 0.986
    # vs 1.031 ms a batch-1 step of qwen3-0.6b on an H200, PERF.md row 22)
    fused_small_batch_merge: bool = True
    # GPU, TP=1: steps of up to this many tokens that the fused path does not take keep cuBLAS and the
    # norm kernels for qkv and gate_up but run o_proj and down_proj as skinny-GEMM kernels whose split-K
    # partial sums the next norm adds up (at 2-16 rows the fused norm prologue is what loses, PERF.md
    # row 27); 0: off. None: FUSED_AUTO_ROW_PARALLEL_TOKENS for the models FUSED_AUTO_MAX_HIDDEN admits
    fused_row_parallel_tokens: int | None = None
    # steps on that path also run qkv_proj and gate_up_proj as skinny GEMMs (after the norm kernels,
    # SiLU * up in gate_up's epilogue: no silu_mul kernel), so only the norms stay apart. Off until
    # timed (reports/PERF.md row 50)
    fused_row_parallel_columns: bool = False
    # GPU, TP=1: every decode step's attention, not only the fused path's, folds in what
    # fused_small_batch_rotary and _merge name (q/k norm, rotary and KV store; the split merge): one
    # or two kernels fewer a layer at any batch size. Off until measured at 16-256 sequences
    fused_decode_attention: bool = False
    # batch-1 decode steps run every decoder layer in one persistent kernel, with grid barriers where
    # the fused path has kernel boundaries (engine/kernels/persistent_decode.py; GPU, TP=1, a
    # model-dtype KV cache, a power-of-two head_dim, else off). On an H200 it takes batch-1 TPOT to
    # 0.94x at 640 cached tokens for qwen3-0.6b and llama-3-8b (PERF row 55)
    persistent_decode: bool = True
    # the most tokens a sequence may hold after the step for persistent_decode to take it; longer ones
    # take the fused path, whose decode kernel pipelines its key tiles where the persistent kernel
    # loads them one at a time after the first. None: PERSISTENT_AUTO_CONTEXT by the size of a
    # decoder layer (on an H200 the kernel still cut llama-3-8b's TPOT by 2.8 percent at 3,072 tokens,
    # while qwen3-0.6b, whose layers are 14 times smaller, lost up to 5 percent past 1,024: PERF row 55)
    persistent_decode_max_context: int | None = None
    # decode steps of up to this many sequences (1-16) take the persistent kernel (then padded to
    # the decode graph sizes 1, 2, 4, 8, 16). Above 1: correct on the CPU, untimed on a GPU
    persistent_decode_max_seqs: int = 1
    async_scheduling: bool | None = None  # plan step N+1 while step N runs; None: on for CUDA (any TP size)
    # warm_up() ends with gc.collect() and gc.freeze(): the start-up heap (modules, compiled kernels,
    # graphs) leaves the collector's scans, so a full collection no longer stalls a decode step for
    # ~0.1-0.3 s; shutdown() unfreezes it
    freeze_gc: bool = True
    tensor_parallel_size: int = 1
    disable_custom_all_reduce: bool = False  # TP on GPUs: NCCL for every all-reduce (no symmetric memory)
    # TP on GPUs: row-parallel outputs summed inside the next RMSNorm kernel, see ALL_REDUCE_NORM_FUSIONS
    all_reduce_norm_fusion: str = "push"
    dist_init_method: str | None = None  # None: a free localhost port chosen at start
    dist_timeout_s: float = 600.0  # TP: bounds start-up (loading, profiling), each step and each collective
    tokenizer: str | None = None  # None: the checkpoint's own (presets: a byte-level tokenizer)
    skip_tokenizer_init: bool = False  # no tokenizer (vLLM's name): token-id prompts only, no stop strings or text
    # Resolved in __post_init__ (never passed in; dataclasses.replace resolves them again)
    model_config: ModelConfig = field(init=False, repr=False)
    load_format: str = field(init=False)  # see LOAD_FORMATS
    device_type: str = field(init=False)  # "cuda" | "cpu": what device="auto" became
    resolved_dtype: str = field(init=False)  # a DTYPES name: what dtype="auto" became
    resolved_fused_tokens: int = field(init=False)  # what fused_small_batch_tokens=None became
    resolved_row_parallel_tokens: int = field(init=False)  # what fused_row_parallel_tokens=None became
    resolved_persistent_context: int = field(init=False)  # what persistent_decode_max_context=None became

    def __post_init__(self) -> None:
        self.model_config, self.load_format = _resolve_model(self.model)
        _check_choice("dtype", self.dtype, DTYPE_CHOICES)
        self.device_type = _resolve_device_type(self.device)
        self.resolved_dtype = _resolve_dtype(self.dtype, self.device_type)
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPE_CHOICES)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        # flash_attn: CUDA, a model-dtype KV cache, installed
        check_backend(self.attention_backend, self.device_type, self.resolved_dtype, self.kv_cache_dtype)
        _check_choice("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        _check_choice("static_reservation", self.static_reservation, STATIC_RESERVATIONS)
        _check_choice("all_reduce_norm_fusion", self.all_reduce_norm_fusion, ALL_REDUCE_NORM_FUSIONS)
        _check_positive(self, "block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size")
        self.resolved_persistent_context = _resolve_persistent_context(self.persistent_decode_max_context,
                                                                       self.model_config)
        seqs = self.persistent_decode_max_seqs
        if not _is_int(seqs) or not 1 <= seqs <= PERSISTENT_MAX_SEQS:
            raise ValueError(f"persistent_decode_max_seqs must be an int in [1, {PERSISTENT_MAX_SEQS}], got {seqs!r}")
        if self.max_graph_prefill_tokens < 0:
            raise ValueError(f"max_graph_prefill_tokens must be >= 0 (0: no prefill graphs), "
                             f"got {self.max_graph_prefill_tokens}")
        self.resolved_fused_tokens = _resolve_fused_tokens("fused_small_batch_tokens", self.fused_small_batch_tokens,
                                                           self.model_config, 1)
        self.resolved_row_parallel_tokens = _resolve_fused_tokens(
            "fused_row_parallel_tokens", self.fused_row_parallel_tokens, self.model_config, FUSED_AUTO_ROW_PARALLEL_TOKENS)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2 (one is the null block), got {self.num_kv_blocks}")
        if not isinstance(self.freeze_gc, bool):
            raise ValueError(f"freeze_gc must be a bool, got {self.freeze_gc!r}")
        for name in ("fused_small_batch_pdl", "fused_small_batch_rotary", "fused_small_batch_merge",
                     "fused_row_parallel_columns", "fused_decode_attention", "persistent_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.skip_tokenizer_init, bool):
            raise ValueError(f"skip_tokenizer_init must be a bool, got {self.skip_tokenizer_init!r}")
        if self.skip_tokenizer_init and self.tokenizer is not None:
            raise ValueError("tokenizer and skip_tokenizer_init=True exclude each other: choose one")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        limit = self.model_config.max_position_embeddings
        if self.max_model_len is None:
            self.max_model_len = min(limit, 8192)
        if not 1 < self.max_model_len <= limit:
            raise ValueError(f"max_model_len must be in (1, {limit}] for this model, got {self.max_model_len}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len})"
            )
        mc = self.model_config
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(mc, name) % self.tensor_parallel_size:
                raise ValueError(
                    f"tensor_parallel_size={self.tensor_parallel_size} does not divide {name}={getattr(mc, name)}"
                )

    @property
    def is_preset(self) -> bool:
        return self.load_format == "dummy"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.resolved_dtype]

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        """What the KV cache stores: the model's dtype ("auto") or an 8-bit float."""
        return KV_CACHE_DTYPES.get(self.kv_cache_dtype, self.torch_dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token at the cache's dtype, all ranks together."""
        return self.model_config.kv_bytes_per_token(self.kv_cache_torch_dtype.itemsize)

    def device_for_rank(self, rank: int = 0) -> torch.device:
        """The device of tensor-parallel rank `rank`: device="cuda" or "auto" on a CUDA host
        gives rank r cuda:r; an explicit index ("cuda:1") is used as given."""
        if self.device_type == "cpu":
            return torch.device("cpu")
        device = torch.device(self.device if self.device != "auto" else "cuda")
        return device if device.index is not None else torch.device("cuda", rank)

    def describe(self) -> dict[str, Any]:
        """The user's settings and what they resolved to, for report metadata (JSON-able)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model_config"}
        out["torch_dtype"] = dtype_name(self.torch_dtype)
        out["kv_cache_torch_dtype"] = dtype_name(self.kv_cache_torch_dtype)
        return out

    def with_overrides(self, **kwargs: Any) -> EngineConfig:
        return replace(self, **kwargs)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls) if f.init}


def _resolve_model(model: str) -> tuple[ModelConfig, str]:
    """The model's shape and load format: a preset name (dummy weights) or a checkpoint dir."""
    if model in PRESETS:
        return PRESETS[model], "dummy"
    if os.path.isdir(model):
        return ModelConfig.from_hf_dir(model), "checkpoint"
    raise ValueError(
        f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a local checkpoint directory"
    )


def _resolve_device_type(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r} is not valid; choose 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    return parsed.type


# fused_small_batch_tokens=None: single-token steps (batch 1) of models no wider than this. On one
# H200 (reports/PERF.md row 20) the fused kernels won at batch 1 for qwen3-0.6b (hidden 1,024: 0.97
# vs 1.33 ms a step) and lost for llama-3-8b (hidden 4,096: 4.60 vs 4.36 ms), and at 2-16 tokens,
# where they pad to 16-row tensor-core tiles, they lost for both.
FUSED_AUTO_MAX_HIDDEN = 2048
# persistent_decode_max_context=None: (tokens for layers of at least PERSISTENT_BIG_LAYER
# parameters, tokens for smaller ones), from H200 A/Bs (PERF row 55): llama-3-8b (218M a layer)
# gained 2.8-6.7 percent at 640-3,072 cached tokens; qwen3-0.6b (16M) gained 5.9 at 640 and lost
# 0-5 past 1,024
PERSISTENT_AUTO_CONTEXT = (3072, 1024)
PERSISTENT_BIG_LAYER = 100_000_000


# fused_row_parallel_tokens=None: steps of up to this many tokens, for the same models. On one H200
# qwen3-0.6b's decode steps of 2 and 4 sequences took 1.19 and 1.26 ms with it against 1.38-1.46
# without (PERF.md row 28); once its tiles split K 4 ways up to 32 rows (row 49), steps of 8, 16,
# 24 and 32 sequences took 1.32, 1.49, 1.71 and 1.96 ms against cuBLAS's 1.42, 1.59, 1.79 and 2.03;
# at 48 and 64 sequences (64-row tiles) 2.09 and 2.67 ms against 2.20 and 2.77 (row 51)
FUSED_AUTO_ROW_PARALLEL_TOKENS = 64


def _is_int(value: object) -> bool:
    """An int option's value: an int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _resolve_fused_tokens(name: str, tokens: int | None, mc: ModelConfig, auto: int) -> int:
    if tokens is None:
        return auto if mc.hidden_size <= FUSED_AUTO_MAX_HIDDEN else 0
    if not _is_int(tokens) or tokens < 0:
        raise ValueError(f"{name} must be an int >= 0 (0: off) or None (auto), got {tokens!r}")
    return tokens


# persistent_decode_max_seqs' limit: the rows of the persistent kernel's 16-row tiles (its
# MAX_SEQS; config does not import the kernels, which import triton)
PERSISTENT_MAX_SEQS = 16


def _resolve_persistent_context(tokens: int | None, mc: ModelConfig) -> int:
    if tokens is None:
        big, small = PERSISTENT_AUTO_CONTEXT
        return big if layer_parameters(mc) >= PERSISTENT_BIG_LAYER else small
    if not _is_int(tokens) or tokens < 1:
        raise ValueError(f"persistent_decode_max_context must be an int >= 1 or None (auto), got {tokens!r}")
    return tokens


def layer_parameters(mc: ModelConfig) -> int:
    """A decoder layer's projection weights (qkv, o, gate_up, down), in parameters."""
    attention = (mc.num_attention_heads + mc.num_key_value_heads) * mc.head_dim * mc.hidden_size * 2
    return attention + 3 * mc.hidden_size * mc.intermediate_size


def _resolve_dtype(dtype: str, device_type: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return dtype


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(obj, name)}")
