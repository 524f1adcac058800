"""The Llama-family decoder: Llama, Qwen2 (bias on q/k/v) and Qwen3 (RMSNorm on q and k per
head). Module names follow the HF checkpoints so weights load by name; tensor parallelism lives
in the layers, not here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.distributed import SINGLE, TensorParallel
from engine.kernels.device_info import num_sms
from engine.kernels.persistent_decode import (
    DecodeShape,
    LayerTables,
    PersistentPlan,
    PersistentScratch,
    alloc_scratch,
    choose_plan,
    persistent_decode,
)
from engine.kernels.rope import KVStore
from engine.layers.activation import silu_and_mul
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # ([num_blocks, block_size, Hkv, D],) * 2


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, rotary: RotaryEmbedding):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_bias, tp
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        # o_proj and down_proj leave their sums to the norms after them (slots alternate)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, False, tp,
                                        reduce=False, slot=0)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary = rotary
        self.scale = cfg.head_dim**-0.5

    def forward(self, positions, x, kv: KVCache, meta: AttentionMetadata, backend: AttentionBackend,
                skinny: SkinnyRowParallel | None = None, fusion: SmallBatchFusion | None = None):
        qkv = _column_parallel(self.qkv_proj, x, skinny)
        return _row_parallel(self.o_proj, self.attend(positions, qkv, kv, meta, backend, fusion), skinny)

    def attend(self, positions, qkv: torch.Tensor, kv: KVCache, meta: AttentionMetadata,
               backend: AttentionBackend, fusion: SmallBatchFusion | None = None) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) D] -> attention output [T, Hq D] (rotary, KV store, attention).
        `fusion` (the fused small-batch path): a decode step may fold the rotary and KV store
        (fusion.rotary) and the split merge (fusion.merge) into the backend's decode kernel."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
        if (fusion is not None and (fusion.rotary or fusion.merge) and meta.is_decode_only
                and backend.fused_decode):
            rotary = self.rotary.prologue(positions, *norms) if fusion.rotary else None
            if rotary is None:
                q, k, v = self._rotate(positions, q, k, v, norms, kv, meta, backend)
            o = backend.decode_fused(q, k, v, kv[0], kv[1], meta, self.scale, rotary, fusion.merge)
        else:
            q, k, v = self._rotate(positions, q, k, v, norms, kv, meta, backend)
            o = backend.forward(q, k, v, kv[0], kv[1], meta, self.scale)
        return o.reshape(-1, q_size)

    def _rotate(self, positions, q, k, v, norms, kv: KVCache, meta: AttentionMetadata, backend: AttentionBackend):
        """(q, k, v) after the q/k norms and rotary; on a GPU whose backend takes stored K/V, the
        rotary kernel writes K and V into the caches, and k = v = None."""
        if backend.accepts_stored_kv and q.is_cuda:
            store = KVStore(v, kv[0], kv[1], meta.slot_mapping, backend.k_scale, backend.v_scale)
            q, _ = self.rotary(positions, q, k, *norms, store=store)
            return q, None, None
        q, k = self.rotary(positions, q, k, *norms)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, False, tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, tp, reduce=False, slot=1)

    def forward(self, x: torch.Tensor, skinny: SkinnyRowParallel | None = None) -> torch.Tensor:
        return _row_parallel(self.down_proj, _column_parallel(self.gate_up_proj, x, skinny, gated=True), skinny)


@dataclass(frozen=True)
class SkinnyRowParallel:
    """o_proj and down_proj of a small step as skinny-GEMM kernels (split-K partial sums for the
    norm after them), the rest of the layer as usual; with `columns`, qkv_proj and gate_up_proj
    (SiLU * up in its epilogue) too, on the norm kernels' output; `pdl`: launched as programmatic
    dependents."""

    pdl: bool = False
    columns: bool = False


def _row_parallel(layer: RowParallelLinear, x: torch.Tensor, skinny: SkinnyRowParallel | None) -> torch.Tensor:
    return layer(x) if skinny is None else layer.forward_fused(x, pdl=skinny.pdl)


def _column_parallel(layer: ColumnParallelLinear, x: torch.Tensor, skinny: SkinnyRowParallel | None,
                     gated: bool = False) -> torch.Tensor:
    """x W^T (+ b), and with `gated` SiLU(gate) * up of it: one skinny GEMM with skinny.columns."""
    if skinny is not None and skinny.columns:
        return layer.forward_fused(x, gated=gated, pdl=skinny.pdl)[0]
    return silu_and_mul(layer(x)) if gated else layer(x)


@dataclass(frozen=True)
class SmallBatchFusion:
    """DecoderLayer's fused path (EngineConfig.fused_small_batch_tokens, _pdl, _rotary, _merge):
    steps of up to `max_tokens` tokens on a GPU at TP=1; `pdl`: its kernels launch as
    programmatic dependents; on its decode steps, the decode attention kernel applies the q/k
    norm and rotary and stores K/V (`rotary`) and merges its own splits (`merge`). Larger steps
    of up to `row_parallel_tokens` (EngineConfig.fused_row_parallel_tokens) take the usual path
    with o_proj and down_proj as skinny GEMMs, and with `row_parallel_columns` qkv_proj and
    gate_up_proj too (SkinnyRowParallel). `every_decode`
    (EngineConfig.fused_decode_attention): the usual path's decode steps fold `rotary` and
    `merge` into the decode kernel too. (EngineConfig.persistent_decode is not here: the runner
    marks the steps it takes in the metadata, AttentionMetadata.persistent.)"""

    max_tokens: int = 0
    pdl: bool = False
    rotary: bool = False
    merge: bool = False
    row_parallel_tokens: int = 0
    every_decode: bool = False
    row_parallel_columns: bool = False


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, rotary: RotaryEmbedding,
                 fusion: SmallBatchFusion = SmallBatchFusion()):
        super().__init__()
        self.self_attn = Attention(cfg, tp, rotary)
        self.mlp = MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tp = tp
        self.fusion = fusion if tp.size == 1 else SmallBatchFusion()
        self._skinny = SkinnyRowParallel(self.fusion.pdl, self.fusion.row_parallel_columns)

    def forward(self, positions, h, residual, kv, meta, backend):
        # h: the embedding (summed) in the first layer, else the previous down_proj's partial sums
        tokens = h.shape[-2]
        if h.is_cuda and tokens <= self.fusion.max_tokens:
            return self._forward_fused(positions, h, residual, kv, meta, backend)
        skinny = self._skinny if h.is_cuda and tokens <= self.fusion.row_parallel_tokens else None
        return self._forward(positions, h, residual, kv, meta, backend, skinny)

    def _forward(self, positions, h, residual, kv, meta, backend, skinny: SkinnyRowParallel | None = None):
        """The usual path: norm, attention, norm, MLP; o_proj and down_proj leave partial sums
        (per TP rank, or with `skinny`, per K split) that the next norm adds up."""
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual, self.tp)
        fusion = self.fusion if self.fusion.every_decode else None
        h = self.self_attn(positions, h, kv, meta, backend, skinny, fusion)  # partial sums
        h, residual = self.post_attention_layernorm(h, residual, self.tp)
        return self.mlp(h, skinny), residual  # partial sums

    def _forward_fused(self, positions, h, residual, kv, meta, backend):
        """Small batches on one GPU: each norm runs in the prologue of the projection after it and
        SiLU * up in gate_up's epilogue; o_proj and down_proj may return split-K partial sums
        [S, T, hidden] for that next norm to add up. Four projection kernels a layer, besides
        rotary and attention, where the path above launches ~8; on decode steps with
        fusion.rotary and .merge, attention is one kernel (rotary, KV store, splits, merge):
        5 kernels a layer."""
        attn, mlp, pdl = self.self_attn, self.mlp, self.fusion.pdl
        qkv, residual = attn.qkv_proj.forward_fused(h, self.input_layernorm.prologue(residual), pdl=pdl)
        h = attn.o_proj.forward_fused(attn.attend(positions, qkv, kv, meta, backend, self.fusion), pdl=pdl)
        act, residual = mlp.gate_up_proj.forward_fused(h, self.post_attention_layernorm.prologue(residual),
                                                       gated=True, pdl=pdl)
        return mlp.down_proj.forward_fused(act, pdl=pdl), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, fusion: SmallBatchFusion = SmallBatchFusion()):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, self.rotary, fusion)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tp = tp
        self.config = cfg
        # built at the first persistent step of each batch size (the plan's seqs)
        self._persistent: dict[int, PersistentDecode] = {}

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta, backend) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        # meta.persistent: the runner's choice, a decode step of few short sequences where the kernel
        # can run (ModelRunner.persistent_max_context, graph_shapes.takes_persistent); GPU only
        if meta.persistent and h.is_cuda:
            h, residual = self.forward_persistent(h, positions, kv_caches, meta)
        else:
            for layer, kv in zip(self.layers, kv_caches):
                h, residual = layer(positions, h, residual, kv, meta, backend)
        h, _ = self.norm(h, residual, self.tp)
        return h  # [T, hidden]

    def forward_persistent(self, h: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                           meta: AttentionMetadata, programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decoder layer of a decode step (a token a sequence) in one persistent kernel
        (engine.kernels.persistent_decode): h [S, H], the embeddings, -> (the last down_proj's
        partial sums, the residual) for the last norm. `programs`: the grid (default one per SM)."""
        seqs = h.shape[0]
        state = self._persistent.get(seqs)
        if state is None or (programs is not None and state.plan.programs != programs):
            state = self._persistent[seqs] = PersistentDecode.build(self, h.device, programs, seqs)
        out = persistent_decode(h, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables, kv_caches,
                                self.rotary.cos, self.rotary.sin, state.tables, state.shape, state.plan,
                                state.scratch, self.layers[0].self_attn.scale, check=not state.checked)
        state.checked = True
        return out


@dataclass
class PersistentDecode:
    """What the persistent decode kernel reads besides the step's inputs: per-layer weight
    addresses, the model's sizes, the work split and the scratch (one set a model and batch
    size). Built at the first persistent step, after the weights are loaded: the tables hold their addresses,
    so the parameters must not be replaced afterwards."""

    tables: LayerTables
    shape: DecodeShape
    plan: PersistentPlan
    scratch: PersistentScratch
    checked: bool = False

    @staticmethod
    def build(model: LlamaModel, device: torch.device, programs: int | None = None, seqs: int = 1) -> PersistentDecode:
        cfg, layers = model.config, model.layers
        attn = [layer.self_attn for layer in layers]

        def table(params) -> torch.Tensor:
            return torch.tensor([p.data_ptr() for p in params], dtype=torch.int64, device=device)

        tables = LayerTables(
            qkv=table(a.qkv_proj.weight for a in attn), o=table(a.o_proj.weight for a in attn),
            gate_up=table(layer.mlp.gate_up_proj.weight for layer in layers),
            down=table(layer.mlp.down_proj.weight for layer in layers),
            input_norm=table(layer.input_layernorm.weight for layer in layers),
            post_norm=table(layer.post_attention_layernorm.weight for layer in layers),
            bias=table(a.qkv_proj.bias for a in attn) if cfg.attention_bias else None,
            q_norm=table(a.q_norm.weight for a in attn) if cfg.qk_norm else None,
            k_norm=table(a.k_norm.weight for a in attn) if cfg.qk_norm else None,
        )
        shape = DecodeShape(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                            cfg.head_dim, cfg.num_hidden_layers, cfg.rms_norm_eps, cfg.qk_norm, cfg.attention_bias)
        plan = choose_plan(shape, programs or num_sms(device), seqs)
        return PersistentDecode(tables, shape, plan, alloc_scratch(shape, plan, model.norm.weight.dtype, device))


class LlamaFamilyForCausalLM(nn.Module):
    # checkpoint name fragment -> (our fused parameter fragment, shard id)
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE, fusion: SmallBatchFusion = SmallBatchFusion()):
        """fusion: which steps take DecoderLayer's fused small-batch path (default: none)."""
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, tp, fusion)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches, meta, backend) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, backend)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """[n, hidden] -> [n, vocab]; with gather=False, this rank's slice of the vocabulary."""
        return self.lm_head(hidden, gather)
