"""The single-sequence CPU decoder (kfoundry/model/decode.py) computes what the general forward computes."""

import copy

import pytest
import torch
from conftest import assert_greedy_agrees_where_clear, decoder_logits

from kfoundry.config import ModelConfig
from kfoundry.model.decode import SequenceDecoder, interleave_order
from kfoundry.model.generate import SamplingParams, generate
from kfoundry.model.llama import Transformer
from kfoundry.model.quantize import quantize_int8

SHAPES = {
    "gqa-tied": dict(n_heads=6, n_kv_heads=2, tie_embeddings=True),
    "mha-untied": dict(n_heads=4, n_kv_heads=4, tie_embeddings=False),
    "mqa": dict(n_heads=4, n_kv_heads=1, tie_embeddings=True),
    "qk-norm": dict(n_heads=4, n_kv_heads=2, tie_embeddings=False, qk_norm=True),
}


def build(shape: str, seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=300, dim=96, n_layers=3, ffn_dim=160, max_seq_len=64, init_std=0.2,
                      **SHAPES[shape])
    model = Transformer.build(cfg, seed=seed).eval()
    with torch.no_grad():  # non-trivial gains, so folding them into the matrices is actually exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def test_interleave_order_pairs_the_halves():
    assert interleave_order(8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_step_logits_match_full_forward(shape):
    model = build(shape)
    ids = [1, 17, 250, 3, 99, 42, 7, 180, 5, 61]
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0]
    dec = SequenceDecoder(model, max_len=len(ids))
    got = [dec.prefill(ids[:4])]
    got += [dec.step(t) for t in ids[4:-1]]
    for j, logits in enumerate(got):
        torch.testing.assert_close(logits, full[3 + j], atol=2e-5, rtol=1e-5)
    dec.step(ids[-1])  # the last free position
    with pytest.raises(ValueError, match="full"):
        dec.step(1)


def test_int8_model_decodes_like_its_own_forward():
    model = quantize_int8(build("gqa-tied"))
    ids = [1, 17, 250, 3, 99, 42, 7, 180]
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0]
    dec = SequenceDecoder(model, max_len=len(ids))
    got = [dec.prefill(ids[:3])] + [dec.step(t) for t in ids[3:]]
    for j, logits in enumerate(got[:-1]):
        # int8 products round activations to bfloat16 on the way in (quantize.py); both paths do, at different
        # points (the decoder scales by 1/rms after the product), so they agree to a few bfloat16 roundings
        ref = full[2 + j]
        assert (logits - ref).norm() / ref.norm() < 3e-2  # a wrong layout or scale is off by O(1)


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by recomputing the whole sequence at every step: no cache, no decoder. Returns the tokens
    and the logits that chose them."""
    ids, chose = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            chose.append(model(torch.tensor([ids]))[0, -1])
            ids.append(int(chose[-1].argmax()))
    return ids[len(prompt):], torch.stack(chose)


def assert_decoder_greedy_matches_reference(model: Transformer, prompt: list[int], n: int) -> None:
    """`generate` (the decoder) picks the reference's tokens wherever the reference's top-two gap exceeds twice
    the decoder's measured logit difference (float32 vs float32, summed in another order: ~1e-5); a random model
    has near ties that any summation order may swap, and those are not compared."""
    want, want_logits = reference_greedy(model, prompt, n)
    got = generate(model, [prompt], SamplingParams(max_new_tokens=n))[0]
    err = assert_greedy_agrees_where_clear(want_logits, decoder_logits(model, prompt, want, n), want, got,
                                           min_compared=n * 3 // 4)
    assert err < 1e-3  # float rounding, not a wrong layout or scale (those are off by O(1))


@pytest.mark.parametrize("shape", ["gqa-tied", "qk-norm"])
def test_generate_single_prompt_uses_decoder_and_matches_reference(shape):
    model = build(shape)
    prompt = [1, 5, 9, 200]
    generate(model, [prompt], SamplingParams(max_new_tokens=1))
    assert "_sequence_decoder_weights" in model.__dict__  # generate took the fast path
    assert_decoder_greedy_matches_reference(model, prompt, 30)


def test_decoder_weights_follow_parameter_updates():
    """Prepared copies are rebuilt when the model's weights change (e.g. between SFT steps and a sample)."""
    model = build("gqa-tied")
    prompt = [1, 5, 9]
    generate(model, [prompt], SamplingParams(max_new_tokens=4))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(3.0)
        model.model.layers[1].input_layernorm.weight.add_(0.5)
    assert_decoder_greedy_matches_reference(model, prompt, 12)


def test_unsupported_models_use_general_path():
    model = build("gqa-tied").to(torch.bfloat16)
    assert not SequenceDecoder.supports(model)
    with pytest.raises(ValueError, match="float32 or int8"):
        SequenceDecoder(model, 8)
    out = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=5))[0]
    assert len(out) == 5 and "_sequence_decoder_weights" not in model.__dict__


def test_sampling_with_seed_is_reproducible_through_decoder():
    model = build("mqa")
    p = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=3)
    a = generate(model, [[1, 2, 3]], p)[0]
    b = generate(copy.deepcopy(model), [[1, 2, 3]], p)[0]
    assert a == b and len(a) == 20
