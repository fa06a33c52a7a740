"""Int8 weight-only quantization of our generator: exact arithmetic of the scheme, 4x smaller matrices, the same
greedy tokens as float32 wherever float32's choice is clear of the measured int8 error, and `kfoundry generate
--quantize int8`."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_TEXTS, assert_greedy_agrees_where_clear, decoder_logits
from kfoundry.checkpoint import load_model, save_checkpoint
from kfoundry.cli import main
from kfoundry.model.generate import SamplingParams, generate
from kfoundry.model.llama import Transformer
from kfoundry.model.quantize import Int8Embedding, Int8Linear, model_bytes, quantize_int8, quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread
TRAIN_TEXT = TINY_TEXTS


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer(TRAIN_TEXT, 400)


@pytest.fixture(scope="module")
def build(tiny_checkpoint):
    """build(tie) -> a fresh copy of the random (seed 0) test-micro-sized model, in eval mode (conftest)."""
    return lambda tie: load_model(tiny_checkpoint(TRAIN_TEXT, 400, tie_embeddings=tie)[0]).eval()


@pytest.fixture(scope="module")
def trained(build, tok) -> Transformer:
    """A model that has memorised TRAIN_TEXT, so its next-token choices are confident (as a real model's mostly
    are); a random model's near-ties would make any rounding, int8 or not, flip greedy choices."""
    model = build(True).train()
    stream = torch.tensor([i for t in TRAIN_TEXT for i in tok.encode(t, bos=True, eos=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(stream) - 33, (8,), generator=gen)
        rows = torch.stack([stream[s:s + 33] for s in starts])
        loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_quantize_weight_error_is_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(16, 40) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different magnitude
    w[3] = 0.0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (16,)
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # per-row scales: small rows keep their resolution
    assert bool((q[3] == 0).all())  # an all-zero row stays zero


def test_int8_linear_matches_dequantized_reference():
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(2, 5, 64)
    q, scale = quantize_weight(w)
    ref = torch.nn.functional.linear(x, q.float() * scale[:, None])
    exact = Int8Linear(q, scale, fused=False)(x)  # dequantize, then a float32 matmul
    assert exact.shape == (2, 5, 96) and torch.allclose(exact, ref, atol=1e-4, rtol=1e-5)
    # The kernel path rounds activations (and its output) to bfloat16: 8 significant bits, ~0.4% at worst.
    fused = Int8Linear(q, scale, fused=True)(x)
    assert fused.dtype == torch.float32 and fused.shape == (2, 5, 96)
    assert (fused - ref).abs().max() < 0.01 * ref.abs().max()


@pytest.mark.parametrize("tie", [True, False])
def test_quantized_model_is_smaller_and_close(build, tok, tie, mixed_texts):
    fp32 = build(tie)
    int8 = quantize_int8(copy.deepcopy(fp32))
    assert isinstance(int8.model.embed_tokens, Int8Embedding)
    assert isinstance(int8.model.layers[1].mlp.down_proj, Int8Linear) and isinstance(int8.lm_head, Int8Linear)
    if tie:  # one int8 copy serves the embedding and the head, as one float copy did
        assert int8.lm_head.q.data_ptr() == int8.model.embed_tokens.q.data_ptr()
    ratio = model_bytes(int8) / model_bytes(fp32)
    assert 0.25 < ratio < 0.30, ratio  # int8 matrices + float32 scales, norms and rotary table
    with torch.no_grad():
        for text in [t for t in mixed_texts if t]:
            ids = torch.tensor([tok.encode(text, bos=True)])
            a, b = fp32(ids), int8(ids)
            assert (a - b).abs().max() < 0.05 * a.abs().max(), text
    with pytest.raises(ValueError, match="already quantized"):
        quantize_int8(int8)


def int8_agrees_where_clear(fp32, int8, prompt: list[int], n: int, min_compared: int) -> None:
    """Greedy tokens of both models from `prompt`, checked against each other where float32's choice is clear of
    twice the int8 logit error measured along float32's tokens (conftest)."""
    p = SamplingParams(max_new_tokens=n)
    want, got = generate(fp32, [prompt], p)[0], generate(int8, [prompt], p)[0]
    assert_greedy_agrees_where_clear(decoder_logits(fp32, prompt, want, n), decoder_logits(int8, prompt, want, n),
                                     want, got, min_compared=min_compared)


def test_greedy_tokens_match_float32(tok, trained, mixed_texts):
    fp32 = trained
    int8 = quantize_int8(copy.deepcopy(fp32))
    # Where float32 is sure of itself (text the model learned), int8 decodes its tokens. The premise is measured,
    # not assumed: a position counts only where float32's top-two gap exceeds twice the int8 logit error measured
    # along those tokens; on the AVX-512 EPYC of issue 17 a 0.008 gap flipped, and such a position is skipped.
    for t in TRAIN_TEXT[:3]:
        int8_agrees_where_clear(fp32, int8, tok.encode(t[:12], bos=True), 16, min_compared=8)
    # On any text the next-token distributions stay close: mean KL(fp32 || int8) per position, in nats.
    # (Where two tokens are nearly tied, any rounding may swap them; this bounds how much probability moves.)
    with torch.no_grad():
        for text in mixed_texts:  # includes the empty text: BOS alone
            ids = torch.tensor([tok.encode(text, bos=True)])
            lp32, lp8 = fp32(ids).log_softmax(-1), int8(ids).log_softmax(-1)
            kl = (lp32.exp() * (lp32 - lp8)).sum(-1).mean()
            assert kl < 5e-3, (text, float(kl))


def test_generate_cli_quantize_int8(tok, trained, tmp_path, capsys):
    """The CLI prints what the int8 model decodes, and that agrees with float32 where float32's choice is clear."""
    ckpt = save_checkpoint(tmp_path / "ckpt", trained, tok)
    fp32, int8 = load_model(ckpt), quantize_int8(load_model(ckpt))
    stop = {tok.eos_id, tok.eot_id}
    p = SamplingParams(max_new_tokens=12)
    for prompt in ("대한민국은", "The quick"):
        base = ["generate", "--model", str(ckpt), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12"]
        assert main(base) == 0
        plain = capsys.readouterr().out
        assert main(base + ["--quantize", "int8"]) == 0
        quantized = capsys.readouterr().out
        ids = tok.encode(prompt, bos=True)
        for model, printed in ((fp32, plain), (int8, quantized)):  # the very computations the CLI ran
            assert printed == f"{prompt}{tok.decode(generate(model, [ids], p, stop_ids=stop)[0])}\n"
        int8_agrees_where_clear(fp32, int8, ids, 12, min_compared=6)
    with pytest.raises(SystemExit):  # argparse refuses a scheme we do not have
        main(base + ["--quantize", "int4"])


def test_serve_with_int8_weights_answers_like_generate(tok, trained, tmp_path):
    """`kfoundry serve --quantize int8`: the served model is the int8 one, and a greedy completion equals the
    int8 generator's own greedy output."""
    from fastapi.testclient import TestClient

    from kfoundry.serve.app import app_from_checkpoint

    ckpt = save_checkpoint(tmp_path / "ckpt", trained, tok)
    app, scheduler = app_from_checkpoint(ckpt, quantize="int8")
    try:
        assert any(isinstance(m, Int8Linear) for m in scheduler.model.modules())
        q = copy.deepcopy(trained)
        quantize_int8(q)
        prompt = "대한민국은"
        want = generate(q, [tok.encode(prompt, bos=True)], SamplingParams(max_new_tokens=8),
                        stop_ids={tok.eos_id, tok.eot_id})[0]
        with TestClient(app, base_url="http://localhost") as client:  # a loopback Host (kfoundry/serve/guard.py)
            r = client.post("/v1/completions", json={"model": ckpt.name, "prompt": prompt, "max_tokens": 8,
                                                     "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(want)
    finally:
        scheduler.stop()
    with pytest.raises(ValueError, match="unknown quantization"):
        app_from_checkpoint(ckpt, quantize="int4", start=False)
