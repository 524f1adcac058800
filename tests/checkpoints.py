"""Small random checkpoints built with transformers and saved with `save_pretrained`, plus the
HF `generate` oracle with its top-2 logit gaps (for the near-tie rule in DESIGN.md §5)."""

from __future__ import annotations

import torch
import transformers

from engine.tokenizer import build_byte_tokenizer

ARCHS = ("qwen3", "qwen2", "llama")
_CLASSES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}
NEAR_TIE = 1e-4
# Two correct bf16 engines (TP=1 vs TP=2, Triton vs FlashAttention) round differently, so their
# logits differ by more than float32 reordering does: a top-2 gap under this may flip.
BF16_NEAR_TIE = 0.1


def build_checkpoint(arch: str, path: str, num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0,
                     vocab_size: int = 300, head_dim: int = 16, num_layers: int = 2) -> str:
    config_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[arch])
    config = config_cls(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=512, tie_word_embeddings=(arch != "llama"), eos_token_id=256,
        bos_token_id=256, initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    build_byte_tokenizer().save_pretrained(path)
    return path


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Per prompt: HF greedy tokens and the top-2 logit gap at each generated position."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(  # explicit mask: token 0 in a prompt is not padding
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
        tokens = out.sequences[0, len(prompt):].tolist()
        gaps = [float(t.topk(2).values[0, 0] - t.topk(2).values[0, 1]) for t in out.logits]
        results.append((tokens, gaps))
    return results


def assert_matches_hf(engine_tokens: list[list[int]], reference) -> None:
    """Exact equality, except a differing token where HF's own top-2 gap is a near-tie; the
    sequence is not compared past such a point."""
    for i, (got, (want, gaps)) in enumerate(zip(engine_tokens, reference)):
        assert len(got) == len(want), f"prompt {i}: {len(got)} tokens, HF {len(want)}"
        for j, (a, b) in enumerate(zip(got, want)):
            if a != b:
                assert gaps[j] < NEAR_TIE, f"prompt {i} token {j}: engine {a}, HF {b} (gap {gaps[j]:.2e})\n{got}\n{want}"
                break


def assert_same_up_to_near_tie(got: list[list[int]], want: list[list[int]], gaps: list[list[float]],
                               tie: float = BF16_NEAR_TIE) -> None:
    """Two engines' greedy tokens are equal, except that the first difference in a sequence may
    sit where HF's top-2 gap there (`gaps[i][j]`) is under `tie`; not compared past it."""
    for i, (a, b) in enumerate(zip(got, want)):
        assert len(a) == len(b), f"prompt {i}: {len(a)} tokens vs {len(b)}"
        j = first_difference(a, b)
        assert j is None or gaps[i][j] < tie, f"prompt {i} token {j} (HF gap {gaps[i][j]:.2e}): {a} vs {b}"


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)


def hf_gap_after(path: str, prompt: list[int], prefix: list[int], model=None) -> float:
    """HF's float32 top-2 logit gap for the token after prompt + prefix (teacher-forced: the
    context two engines shared, which need not be HF's own greedy path)."""
    model = model or transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        top = model(torch.tensor([prompt + prefix])).logits[0, -1].topk(2).values
    return float(top[0] - top[1])


def assert_bf16_near(path: str, got: list[list[int]], want: list[list[int]], prompts: list[list[int]],
                     max_new_tokens: int, what: str = "got vs want") -> None:
    """assert_same_up_to_near_tie with HF's top-2 gap at each sequence's first difference,
    computed here on the context both sides shared there (`what` names the pair). HF's gaps on
    its own greedy path would not do: once both engines took another near-tie than HF earlier,
    that path's gaps belong to other contexts."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gaps = []
    for prompt, a, b in zip(prompts, got, want):
        j = first_difference(a, b)
        row = [float("inf")] * max(len(a), len(b), max_new_tokens)
        if j is not None:
            row[j] = hf_gap_after(path, prompt, a[:j], model)
        gaps.append(row)
    try:
        assert_same_up_to_near_tie(got, want, gaps)
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}") from None
