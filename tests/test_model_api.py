"""One way into the model: `hidden()` under `forward`, caches that advance themselves, the attention masks against
a brute-force rule, the shared top-k/top-p filter with per-row settings, and the one device picker."""

from __future__ import annotations

import logging
import unicodedata

import pytest
import torch

from kfoundry.config import ModelConfig
from kfoundry.eval import scoring
from kfoundry.model import masks
from kfoundry.model.device import pick_device
from kfoundry.model.generate import SamplingParams, sample_next
from kfoundry.model.llama import KVCache, Transformer
from kfoundry.model.sampling import filter_logits
from kfoundry.serve.batch import SlotCache, decode_step, prefill
from kfoundry.serve.sampling import sample_rows

CFG = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer.build(CFG, seed=0).eval()


def byte_ids(text: str) -> list[int]:
    """BOS (256), then the UTF-8 bytes of the text as given (NFD input stays NFD: the model sees what it gets)."""
    return [256, *text.encode()]


TEXTS = ["대한민국 헌법", "The quick brown fox", "2026년 12월 😀", unicodedata.normalize("NFD", "한국어 문장")]


# ------------------------------------------------------------------------------------------ hidden / forward


def test_forward_is_the_head_over_hidden(model):
    ids = torch.tensor([byte_ids(TEXTS[0])[:10], byte_ids(TEXTS[3])[:10]])
    with torch.no_grad():
        h = model.hidden(ids)
        assert h.shape == (2, 10, CFG.dim)
        assert torch.equal(model.lm_head(h), model(ids))  # forward runs exactly this: no second copy of it
        doc = masks.DocumentMask.from_lengths([[4, 6], [10]], 10)
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], list(range(10))])
        assert torch.equal(model.lm_head(model.hidden(ids, positions=pos, attn_mask=doc)),
                           model(ids, positions=pos, attn_mask=doc))


def test_scorer_reads_the_backbone(model):
    """eval/scoring applies the head to the scored positions of `hidden()`: its log-likelihood of a Korean, an
    English, an emoji and an NFD continuation equals the sum over the full forward's log-softmax."""
    reqs = [(byte_ids(t)[:6], byte_ids(t)[6:14]) for t in TEXTS]
    got = scoring.score(model, reqs)
    with torch.no_grad():
        for (ctx, cont), (ll, _) in zip(reqs, got):
            full = torch.tensor([ctx + cont[:-1]])
            logp = model(full)[0].float().log_softmax(-1)[len(ctx) - 1:]
            want = float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
            assert abs(ll - want) < 1e-4


# ------------------------------------------------------------------------------------------------- caches


def test_kv_cache_advances_itself(model):
    ids = torch.tensor([byte_ids(TEXTS[2])[:12]])
    cache = KVCache(CFG, 1, 16, "cpu", torch.float32)
    with torch.no_grad():
        assert cache.length == 0 and cache.positions(1, 3, "cpu").tolist() == [[0, 1, 2]]
        a = model(ids[:, :5], cache=cache)
        assert cache.length == 5  # the cache moved itself past what was written; forward never set it
        assert cache.positions(2, 2, "cpu").tolist() == [[5, 6], [5, 6]]
        b = model(ids[:, 5:], cache=cache)
        assert cache.length == 12
        torch.testing.assert_close(torch.cat([a, b], 1), model(ids), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="KV cache full"):
            model(ids[:, :5], cache=cache)
        assert cache.length == 12  # a refused write does not advance it
        other = KVCache(CFG, 1, 4, "cpu", torch.float32)
        model.hidden(ids[:, :3], cache=other)  # the backbone alone advances it too: the cache owns the count
        assert other.length == 3


def test_slot_cache_owns_per_row_lengths(model):
    V = CFG.vocab_size
    cache = SlotCache(CFG, 3, 32, "cpu", torch.float32)
    seqs = [byte_ids(TEXTS[0])[:4], byte_ids(TEXTS[1])[:7]]
    with torch.inference_mode():
        for slot, s in enumerate(seqs):
            prefill(model, cache, slot, s)
        assert cache.lengths == [4, 7, 0]
        tokens = torch.tensor([5, 9])
        logits = decode_step(model, cache, tokens)  # each row at its own length, told by nobody
        assert cache.lengths == [5, 8, 0]
        for i, s in enumerate(seqs):
            s.append(int(tokens[i]))
            torch.testing.assert_close(logits[i], model(torch.tensor([s]))[0, -1], atol=1e-4, rtol=1e-4)
        cache.move(1, 0, 8)  # compaction carries the length along
        assert cache.lengths[0] == 8
        prefill(model, cache, 1, seqs[0][:3])  # a reused slot starts over
        assert cache.lengths[:2] == [8, 3]
        with pytest.raises(ValueError, match="bind"):  # a forward pass through unbound slots is refused
            model(torch.randint(0, V, (1, 1)), cache=cache)
        assert cache.bind(slice(0, 2), 20)[:, 0].tolist() == [8, 3]  # 8 + 20 <= max_len 32
        with pytest.raises(ValueError, match="KV cache full"):
            cache.bind(slice(0, 2), 25)


# -------------------------------------------------------------------------------------------------- masks


def reference_mask(rule, B: int, T: int, S: int) -> torch.Tensor:
    return torch.tensor([[[[bool(rule(b, i, j)) for j in range(S)] for i in range(T)]] for b in range(B)])


def test_masks_equal_their_rules_written_out():
    assert torch.equal(masks.causal(3, 7)[None, None], reference_mask(lambda b, i, j: j <= 4 + i, 1, 3, 7))
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    # causal, never onto padding; a padding query sees itself only
    rule = lambda b, i, j: (j <= i and valid[b, j]) or i == j  # noqa: E731
    assert torch.equal(masks.left_padded_causal(valid), reference_mask(rule, 2, 5, 5))
    assert torch.equal(masks.key_padding(valid), reference_mask(lambda b, i, j: valid[b, j], 2, 1, 5))
    seg = torch.tensor([[0, 0, 1, 1, 2, -1], [0, 1, 2, 2, -1, -1]])
    rule = lambda b, i, j: i == j or (j <= i and seg[b, j] >= 0 and seg[b, j] in (0, seg[b, i]))  # noqa: E731
    assert torch.equal(masks.shared_context(seg), reference_mask(rule, 2, 6, 6))
    pos = torch.tensor([[2], [5], [0]])
    assert torch.equal(masks.up_to_position(pos, 7), reference_mask(lambda b, i, j: j <= pos[b, i], 3, 1, 7))
    doc = masks.DocumentMask.from_lengths([[2, 3], [5]], 6)
    ids = [[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 4]]  # padding runs are documents of their own
    rule = lambda b, i, j: j <= i and ids[b][i] == ids[b][j]  # noqa: E731
    assert torch.equal(doc.dense(), reference_mask(rule, 2, 6, 6))


# --------------------------------------------------------------------------------------------------- filter


def reference_filter(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row, written out token by token: the tokens kept by top-k, then by top-p over what top-k kept."""
    x = row.double() / temperature
    order = sorted(range(len(x)), key=lambda i: -float(x[i]))
    keep = set(order[:top_k] if top_k else order)
    if top_p < 1:
        kept = [i for i in order if i in keep]
        probs = torch.softmax(x[kept], 0)
        mass, nucleus = 0.0, set()
        for i, p in zip(kept, probs.tolist()):
            if mass > top_p:  # the better tokens already exceed top_p
                break
            nucleus.add(i)
            mass += p
        keep = nucleus
    return torch.tensor([i in keep for i in range(len(x))])


def test_filter_applies_each_rows_own_settings():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g) * 3
    temps, ks, ps = [1.0, 0.5, 2.0, 0.7, 1.3], [0, 3, 0, 10, 1], [1.0, 1.0, 0.5, 0.8, 0.3]
    out = filter_logits(logits, temps, ks, ps)
    for r in range(5):
        kept = torch.isfinite(out[r])
        assert torch.equal(kept, reference_filter(logits[r], temps[r], ks[r], ps[r])), r
        torch.testing.assert_close(out[r][kept], logits[r][kept] / temps[r])
        # a row filtered alone, with its settings as plain numbers, is the same row: the batch changes nothing
        assert torch.equal(filter_logits(logits[r:r + 1], temps[r], ks[r], ps[r])[0], out[r])
    assert int(torch.isfinite(out[1]).sum()) == 3 and int(torch.isfinite(out[4]).sum()) == 1
    assert torch.isfinite(out[0]).all()  # top_k 0 and top_p 1 are off
    flat = filter_logits(torch.zeros(2, 1000), [1.0, 1.0], 0, [1.0, 0.5])  # ties: top-p keeps about half
    assert torch.isfinite(flat[0]).all() and 490 < int(torch.isfinite(flat[1]).sum()) < 510


def test_filter_refuses_bad_settings():
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(torch.zeros(2, 4), [1.0, 0.0])
    with pytest.raises(ValueError, match="3 settings for 2 rows"):
        filter_logits(torch.zeros(2, 4), 1.0, [1, 2, 3])


def test_generate_and_serve_draw_from_the_same_filter():
    """top_k = 1 leaves one token whatever the temperature: both samplers must return each row's argmax, and
    serve's rows with other settings in the same batch are untouched by it."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g)
    best = logits.argmax(-1).tolist()
    p = SamplingParams(temperature=1.5, top_k=1)
    assert sample_next(logits, p, torch.Generator().manual_seed(0)).tolist() == best
    params = [p, SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, top_p=1e-6),
              SamplingParams(temperature=0.9, top_k=1, top_p=0.5)]
    assert sample_rows(logits, params, [None] * 4) == best  # top_p ~ 0 keeps the best token only


# --------------------------------------------------------------------------------------------------- device


def test_one_device_picker(caplog):
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None) == pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        pick_device("gpu")
    if not torch.cuda.is_available():  # a recipe written for a GPU still runs here, and says so
        with caplog.at_level(logging.WARNING, logger="kfoundry.model.device"):
            assert pick_device("cuda:1") == torch.device("cpu")
        assert "cuda:1 requested" in caplog.text
    else:
        assert pick_device("cuda") == torch.device("cuda")
