"""The model: Hugging Face parity of the forward pass, KV-cache generation, initialisation and accounting."""

from __future__ import annotations

import pytest
import torch

from kfoundry.config import ModelConfig
from kfoundry.model.generate import SamplingParams, generate
from kfoundry.model.llama import Transformer

CONFIGS = {
    "gqa-tied": ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                            max_seq_len=64, tie_embeddings=True),
    "mha-untied": ModelConfig(vocab_size=300, dim=64, n_layers=3, n_heads=4, n_kv_heads=4, ffn_dim=128,
                              max_seq_len=64, tie_embeddings=False, rope_theta=500000.0),
    "mqa-untied": ModelConfig(vocab_size=300, dim=96, n_layers=2, n_heads=6, n_kv_heads=1, ffn_dim=256,
                              max_seq_len=64, tie_embeddings=False, norm_eps=1e-6),
}


def hf_llama(model: Transformer):
    """The same weights in transformers' own LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kfoundry.export.hf import hf_config

    class Ids:  # token ids are irrelevant to the forward pass
        bos_id, eos_id, pad_id = 1, 2, 0

    hf = LlamaForCausalLM(LlamaConfig(**hf_config(model.cfg, Ids)))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_llama(name):
    torch.manual_seed(0)
    model = Transformer.build(CONFIGS[name], seed=1).eval()
    hf = hf_llama(model)
    idx = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape == (3, 40, 300)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def test_meta_init_is_seeded_and_tied():
    cfg = CONFIGS["gqa-tied"]
    a, b = Transformer.build(cfg, seed=3), Transformer.build(cfg, seed=3)
    c = Transformer.build(cfg, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert torch.equal(a.model.layers[0].input_layernorm.weight, torch.ones(cfg.dim))
    # residual projections are initialised smaller than the others (scaled by 1/sqrt(2 * n_layers))
    assert a.model.layers[0].self_attn.o_proj.weight.std() < 0.7 * a.model.layers[0].self_attn.q_proj.weight.std()


def test_param_count_and_flops():
    cfg = CONFIGS["gqa-tied"]
    m = Transformer.build(cfg, seed=0)
    hd = cfg.head_dim
    per_layer = cfg.dim * hd * (cfg.n_heads + 2 * cfg.n_kv_heads) + cfg.n_heads * hd * cfg.dim
    per_layer += 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim
    assert m.num_params() == cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim + cfg.dim
    untied = Transformer.build(CONFIGS["mha-untied"], seed=0)
    assert untied.num_params() - untied.num_params(exclude_embeddings=True) == 300 * 64
    # 6 FLOPs per matmul weight per token dominates; attention adds a seq-len term
    assert m.flops_per_token(64) > m.flops_per_token(32) > 6 * (m.num_params() - 2 * cfg.n_layers * cfg.dim)


def test_qk_norm_trains_but_is_not_llama_exportable():
    cfg = ModelConfig(**{**CONFIGS["gqa-tied"].__dict__, "qk_norm": True})
    m = Transformer.build(cfg, seed=0)
    assert "model.layers.0.self_attn.q_norm.weight" in m.state_dict()
    loss = m(torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16)))
    loss.backward()
    assert m.model.layers[0].self_attn.q_norm.weight.grad is not None
    from kfoundry.export.hf import hf_config

    with pytest.raises(ValueError, match="QK-norm"):
        hf_config(cfg, None)


def test_z_loss_adds_the_squared_log_normaliser_and_pulls_it_to_zero():
    """z_loss adds coef * logsumexp(logits)^2 per target, skipping ignored targets, under every reduction; and
    training with it drives the log-normaliser toward 0 where plain cross-entropy leaves it drifting."""
    torch.manual_seed(0)
    m = Transformer.build(CONFIGS["gqa-tied"], seed=0)
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    y[0, :5] = -1  # ignored targets: no cross-entropy and no z term
    with torch.no_grad():
        lse = torch.logsumexp(m(x).float(), dim=-1)
        keep = y >= 0
        z = lse[keep].square()
        assert torch.allclose(m(x, y, z_loss=0.5), m(x, y) + 0.5 * z.mean(), rtol=1e-5)
        assert torch.allclose(m(x, y, reduction="sum", z_loss=0.5), m(x, y, reduction="sum") + 0.5 * z.sum(),
                              rtol=1e-5)
        per = m(x, y, reduction="none", z_loss=0.5) - m(x, y, reduction="none")
        assert torch.allclose(per, 0.5 * lse.square().flatten() * keep.flatten(), rtol=1e-4, atol=1e-5)
        assert torch.equal(m(x, y, z_loss=0.0), m(x, y))
    with pytest.raises(ValueError, match="z_loss"):
        m(x, y, z_loss=-1.0)

    def trained(coef: float) -> float:
        model = Transformer.build(CONFIGS["gqa-tied"], seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(30):
            model(x, y, z_loss=coef).backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            return float(torch.logsumexp(model(x).float(), dim=-1).square().mean())

    plain, with_z = trained(0.0), trained(0.1)
    assert with_z < 0.25 * plain, (plain, with_z)  # measured: 110 vs 5.9


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        Transformer(ModelConfig(dim=64, n_heads=4, n_kv_heads=3))
    with pytest.raises(ValueError, match="divisible"):
        Transformer(ModelConfig(dim=66, n_heads=4, n_kv_heads=4))


@pytest.mark.parametrize("name", ["gqa-tied", "mha-untied"])
def test_kv_cache_greedy_equals_full_recompute(name):
    model = Transformer.build(CONFIGS[name], seed=5).eval()
    prompt = [1, 17, 42, 99, 7]
    out = generate(model, [prompt], SamplingParams(max_new_tokens=12))[0]
    # reference: no cache, recompute the whole sequence at every step
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_batched_left_padded_generation_matches_single_rows():
    model = Transformer.build(CONFIGS["gqa-tied"], seed=6).eval()
    prompts = [[1, 5, 9], [1, 200, 201, 202, 203, 204, 77], [1]]
    batched = generate(model, prompts, SamplingParams(max_new_tokens=10), pad_id=0)
    single = [generate(model, [p], SamplingParams(max_new_tokens=10))[0] for p in prompts]
    assert batched == single


def test_stop_tokens_and_sampling_controls():
    model = Transformer.build(CONFIGS["gqa-tied"], seed=7).eval()
    greedy = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=8))[0]
    stop = greedy[3]
    cut = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=8), stop_ids={stop})[0]
    assert cut == greedy[: greedy.index(stop)]
    # top_k=1 is greedy whatever the temperature
    assert generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=0))[0] == greedy
    # the same seed gives the same sample; sampling at high temperature differs from greedy
    s1 = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=16, temperature=2.0, seed=11))[0]
    s2 = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=16, temperature=2.0, seed=11))[0]
    assert s1 == s2 and len(s1) == 16
    # a tiny top_p keeps only the most likely token: greedy again
    assert generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=1))[0] == greedy
    streamed = []
    generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=5), on_token=lambda r, t: streamed.append((r, t)))
    assert [t for _, t in streamed] == greedy[:5]


def test_generation_refuses_too_long_and_empty_prompts():
    model = Transformer.build(CONFIGS["gqa-tied"], seed=0)
    with pytest.raises(ValueError, match="exceeds the model context"):
        generate(model, [[1] * 60], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], SamplingParams(max_new_tokens=1))


def test_multi_token_step_after_cache_equals_full_forward():
    """Feeding several tokens into a non-empty cache (chunked prefill) must stay causal, bottom-right aligned."""
    from kfoundry.model.llama import KVCache

    model = Transformer.build(CONFIGS["gqa-tied"], seed=8).eval()
    seq = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(model.cfg, 2, 32, "cpu", torch.float32)
        first = model(seq[:, :8], cache=cache)
        rest = model(seq[:, 8:], cache=cache)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)


def test_rope_is_computed_in_fp32_whatever_the_activations_dtype():
    """bf16 angles lose the low bits of large positions; the rotation runs in fp32 and only its result is cast."""
    from kfoundry.model.llama import apply_rope, rope_cos_sin, rope_inv_freq, rotate_half

    cos, sin = rope_cos_sin(torch.arange(4096)[None], rope_inv_freq(64, 10000.0))
    assert cos.dtype == sin.dtype == torch.float32
    x = torch.randn(1, 4096, 2, 64, generator=torch.Generator().manual_seed(0)).bfloat16()  # [B, T, H, D]
    got = apply_rope(x, cos, sin)
    exact = apply_rope(x.float(), cos, sin)  # fp32 from end to end
    assert got.dtype == torch.bfloat16 and torch.equal(got, exact.bfloat16())
    bf16_angles = x * cos.bfloat16()[:, :, None] + rotate_half(x) * sin.bfloat16()[:, :, None]  # the old cast
    # ours is the correctly rounded fp32 result, so no element is further from it than the old bf16 arithmetic's
    assert ((got.float() - exact).abs() <= (bf16_angles.float() - exact).abs()).all()
    assert (bf16_angles != got).float().mean() > 0.01


def test_packed_documents_take_no_cache():
    from kfoundry.model.llama import KVCache
    from kfoundry.model.masks import DocumentMask

    model = Transformer.build(CONFIGS["gqa-tied"], seed=0)
    mask = DocumentMask.from_lengths([[3, 5]], row_len=8)
    with pytest.raises(ValueError, match="no KV cache"):
        model(torch.zeros(1, 8, dtype=torch.long), attn_mask=mask,
              cache=KVCache(model.cfg, 1, 16, "cpu", torch.float32))
