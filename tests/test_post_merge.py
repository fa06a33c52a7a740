"""Merging: a model merged with itself is itself, SLERP at t=0/1 returns the endpoints and keeps norms between them,
linear weights are honoured, parents are recorded, and mismatched architectures or tokenizers fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kfoundry import checkpoint as ckpt_io
from kfoundry.cli import main
from kfoundry.config import ModelConfig
from kfoundry.model.llama import Transformer
from kfoundry.post.merge import merge, merge_states, slerp

TEXTS = ["대한민국은 민주공화국이다.", "The quick brown fox 😀", "12,345원", "\u1112\u1161\u11ab\u1100\u1173\u11af"]


@pytest.fixture(scope="module")
def tok():
    from kfoundry.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS * 30, 300)


def make(path, tok, seed, **shape):
    shape = {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64, **shape}
    cfg = ModelConfig(vocab_size=320, max_seq_len=32, tie_embeddings=True, **shape)
    return ckpt_io.save_checkpoint(path, Transformer.build(cfg, seed=seed), tok)


def weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def pair(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    return make(d / "a", tok, seed=1), make(d / "b", tok, seed=2)


def test_merging_a_model_with_itself_is_the_identity(pair, tmp_path):
    a, _ = pair
    for method, ws in (("linear", None), ("linear", [0.2, 0.3, 0.5]), ("slerp", [0.37])):
        models = [a, a, a] if ws and len(ws) == 3 else [a, a]
        out = tmp_path / f"{method}-{len(models)}"
        merge(models, out, method=method, weights=ws)
        wa, wm = weights(a), weights(out)
        assert wa.keys() == wm.keys()
        for k in wa:
            assert torch.allclose(wa[k], wm[k], atol=1e-7, rtol=0), (method, k)
        ids = torch.tensor([ckpt_io.load_tokenizer(out).encode(TEXTS[0], bos=True)])
        with torch.no_grad():
            assert torch.allclose(ckpt_io.load_model(a)(ids), ckpt_io.load_model(out)(ids), atol=1e-6)


def test_slerp_endpoints_and_norm(pair, tmp_path):
    a, b = pair
    for t, expected in ((0.0, a), (1.0, b)):
        out = tmp_path / f"t{t}"
        merge([a, b], out, method="slerp", weights=[t])
        we, wm = weights(expected), weights(out)
        assert all(torch.equal(we[k], wm[k]) for k in we), t
    # halfway between two independent random matrices: a plain average shrinks the norm by ~1/sqrt(2), SLERP not
    x, y = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), torch.randn(64, 64)
    y = y / y.norm() * x.norm()
    mid = slerp(x, y, 0.5)
    assert mid.norm() == pytest.approx(float(x.norm()), rel=1e-4)
    assert (0.5 * x + 0.5 * y).norm() < 0.8 * x.norm()
    # parallel tensors fall back to linear interpolation, no division by sin(0)
    assert torch.allclose(slerp(x, 2 * x, 0.25), 1.25 * x)


def test_linear_weights_and_recorded_parents(pair, tmp_path):
    a, b = pair
    out = tmp_path / "lin"
    assert main(["merge", "--models", str(a), str(b), "--weights", "3", "1", "--method", "linear",
                 "--out", str(out)]) == 0
    wa, wb, wm = weights(a), weights(b), weights(out)
    for k in wa:
        assert torch.allclose(wm[k], 0.75 * wa[k] + 0.25 * wb[k], atol=1e-6)
    ckpt_io.verify(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "merge" and meta["method"] == "linear" and meta["weights"] == [0.75, 0.25]
    assert [p["path"] for p in meta["parents"]] == [str(a.resolve()), str(b.resolve())]
    manifest_a = json.loads((a / "manifest.json").read_text())["files"]["model.safetensors"]
    assert meta["parents"][0]["model_sha256"] == manifest_a
    assert ckpt_io.load_tokenizer(out).hash == ckpt_io.load_tokenizer(a).hash
    # merge_states on its own: the same weighted average
    merged = merge_states([wa, wb], "linear", [0.75, 0.25])
    assert all(torch.allclose(merged[k], wm[k]) for k in wa)


def test_mismatches_fail_clearly(pair, tok, tmp_path, capsys):
    from kfoundry.tokenizer import train_tokenizer

    a, b = pair
    wider = make(tmp_path / "wide", tok, seed=3, n_kv_heads=2)
    with pytest.raises(ValueError, match=r"architectures differ \(n_kv_heads: 1 vs 2\)"):
        merge([a, wider], tmp_path / "x")
    other_tok = train_tokenizer(["완전히 다른 말뭉치입니다. Different corpus."] * 30, 300)
    foreign = make(tmp_path / "foreign", other_tok, seed=1)
    assert ckpt_io.load_config(foreign) == ckpt_io.load_config(a)  # same shape, different tokens
    with pytest.raises(ValueError, match="tokenizers differ"):
        merge([a, foreign], tmp_path / "y")
    with pytest.raises(ValueError, match="exactly two"):
        merge([a, b, a], tmp_path / "z", method="slerp")
    with pytest.raises(ValueError, match="one weight per model"):
        merge([a, b], tmp_path / "z", weights=[1, 2, 3])
    with pytest.raises(ValueError, match="at least two"):
        merge([a], tmp_path / "z")
    assert main(["merge", "--models", str(a), str(wider), "--out", str(tmp_path / "w")]) == 2
    assert "architectures differ" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
