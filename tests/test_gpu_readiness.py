"""The GPU path, checked on a CPU: document-masked SFT without a dense mask, no wasted shard tokens, the peak table,
and the attention kernels pretraining and SFT dispatch to."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kfoundry.config import ModelConfig
from kfoundry.corpus import Document
from kfoundry.data.loader import PackedLoader
from kfoundry.data.shards import write_shards
from kfoundry.model.llama import Transformer
from kfoundry.model.masks import DocumentMask
from kfoundry.post import sft as S
from kfoundry.train import mfu as M

from conftest import MIXED_TEXTS, ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread

CFG = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=128,
                  tie_embeddings=True)


def packed_batch(seed: int = 0, n: int = 24, seq_len: int = 96) -> S.PackedBatch:
    """Conversations of 5..40 tokens (assistant tokens in the second half) packed into rows of `seq_len`."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(5, 40)
        ids = tuple(rng.randrange(CFG.vocab_size) for _ in range(length + 1))
        examples.append(S.Example(ids, tuple(i > length // 2 for i in range(length + 1))))
    return S.collate(S.pack(examples, seq_len), pad_id=0)


def old_dense_mask(positions: torch.Tensor) -> torch.Tensor:
    """The mask SFT built on the host every step before masks.DocumentMask: [B, 1, T, T], causal within a
    conversation, nothing across; a padding position (position -1) attends to itself only."""
    T = positions.shape[1]
    seg = (positions == 0).cumsum(-1).masked_fill(positions < 0, -1)
    mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril() & (seg[:, :, None] >= 0)
    return (mask | torch.eye(T, dtype=torch.bool) & (seg[:, :, None] < 0))[:, None]


class ShapeLog(TorchDispatchMode):
    """Every tensor shape any operator produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def loss_and_grads(model, batch, attn_mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(batch.x, batch.y, positions=batch.positions.clamp(min=0), attn_mask=attn_mask,
                 reduction="sum") / batch.n_targets
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_document_masked_sft_matches_the_dense_mask_without_building_one():
    model = Transformer.build(CFG, seed=0)
    batch = packed_batch()
    B, T = batch.x.shape
    assert T not in (CFG.dim, CFG.head_dim, CFG.ffn_dim, CFG.vocab_size, B)  # a [.., T, T] shape is unambiguous
    assert isinstance(batch.attn_mask, DocumentMask) and len(batch.attn_mask.bounds) > 2 * B  # several per row

    with ShapeLog() as log:  # the real SFT loss function, forward and backward
        loss = S.packed_loss_sum(model, batch) / batch.n_targets
        loss.backward()
    square = [s for s in log.shapes if len(s) >= 2 and s[-2:] == (T, T)]
    assert not square, f"a dense [.., T, T] tensor was built: {square[:3]}"

    doc_loss, doc_grads = loss_and_grads(model, batch, batch.attn_mask)
    dense_loss, dense_grads = loss_and_grads(model, batch, old_dense_mask(batch.positions))
    assert torch.allclose(doc_loss, loss.detach())
    assert torch.allclose(doc_loss, dense_loss, rtol=1e-5, atol=1e-6), (doc_loss, dense_loss)
    for a, b in zip(doc_grads, dense_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
    # the mask really confines attention: dropping it (plain causal over the packed rows) moves the loss by far
    # more than the two masked paths differ
    leaky, _ = loss_and_grads(model, batch, None)
    assert abs(float(leaky - dense_loss)) > 100 * max(abs(float(doc_loss - dense_loss)), 1e-6)


def test_document_mask_layout():
    m = DocumentMask.from_lengths([[3, 2], [5]], row_len=6)
    assert m.bounds == (0, 3, 5, 6, 11, 12) and m.cu_seqlens.dtype == torch.int32  # padding runs are segments
    assert m.segment_ids().tolist() == [[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 3, 4]]
    dense = m.dense()[:, 0]
    assert dense[0, 4].tolist() == [False, False, False, True, True, False]  # causal within its conversation
    with pytest.raises(ValueError, match="do not fit"):
        DocumentMask.from_lengths([[4, 3]], row_len=6)
    # collate counts on the host, so a training step needs no device sync to know its denominator
    batch = packed_batch(seed=1)
    assert batch.n_targets == int((batch.y >= 0).sum()) and batch.n_tokens == int((batch.positions >= 0).sum())


# ----------------------------------------------------------------------------------------------- shard tokens


@pytest.fixture(scope="module")
def long_doc_shards(tiny_tokenizer, tmp_path_factory) -> Path:
    """Documents from 3 to ~150 tokens (many longer than a row of 32) in Korean, English, digits, emoji, NFD."""
    texts = [t for t in MIXED_TEXTS if t]
    tok = tiny_tokenizer(texts * 30, 400)
    rng = random.Random(0)
    docs = [Document(text=" ".join(rng.choices(texts, k=rng.randint(1, 12))), id=f"d{i}", source="t", lang="ko")
            for i in range(80)]
    out = tmp_path_factory.mktemp("long") / "shards"
    write_shards(docs, tok, out, val_fraction=0.1, seed=0, shard_tokens=700)
    return out


def stream_of(loader: PackedLoader, epochs: range) -> np.ndarray:
    """The documents of `epochs`, in the loader's order, as one token stream."""
    return np.concatenate([loader._shards[loader._shard_of[d]][loader._starts[d]:loader._starts[d] + loader._lengths[d]]
                           for e in epochs for d in loader.documents(e)])


def test_every_shard_token_is_trained_on_once_per_epoch(long_doc_shards):
    seq_len, batch_size = 32, 3
    loader = PackedLoader(long_doc_shards, "train", batch_size=batch_size, seq_len=seq_len, seed=4)
    lengths = loader._lengths[loader.documents(0)]
    total = loader.split_tokens
    assert (lengths > seq_len + 1).mean() > 0.2  # many documents are longer than a row

    # Read batches until epoch 0 is consumed; the rows, minus the one token each shares with the next, must be
    # exactly the epoch's documents in order, so every token is read, none twice, none skipped.
    rows, predicted = [], 0
    it = iter(loader)
    while len(rows) * seq_len < total + seq_len:
        x, y = next(it)
        rows += [torch.cat([rx, ry[-1:]]).numpy() for rx, ry in zip(x, y)]
    stream = np.concatenate([r[:-1] for r in rows])
    expected = stream_of(loader, range(2))
    assert np.array_equal(stream, expected[: len(stream)])
    predicted = min(len(rows) * seq_len, total) - 1  # targets of epoch-0 tokens: all but the stream's first token
    used = predicted / total
    assert used >= 0.99 and loader.token_use() == pytest.approx(used)

    # What cropping at every row (the old rule) would have trained on, on the same documents: far less.
    cropped, filled = 0, 0
    for n in lengths:
        take = min(int(n), seq_len + 1 - filled)
        cropped, filled = cropped + take, filled + take
        if filled == seq_len + 1:
            filled = 0
    assert cropped / total < 0.9


def test_resume_inside_a_document_is_exact(long_doc_shards):
    def make(batch_size=2):
        return PackedLoader(long_doc_shards, "train", batch_size=batch_size, seq_len=32, seed=1)

    ref, it = make(), None
    it = iter(ref)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(ref.state_dict()))
    assert state["offset"] > 0 and state["version"] == 2  # the next row starts inside a document
    expected = []
    while ref.epoch == 0:  # on into the next epoch, and a few batches beyond
        expected.append(next(it))
    expected += [next(it) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(state)
    for (xe, ye), (xg, yg) in zip(expected, iter(resumed)):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)
    # two ranks of batch 1 see the rows one process of batch 2 sees, from the same state
    ranks = [PackedLoader(long_doc_shards, "train", batch_size=1, seq_len=32, seed=1, rank=r, world_size=2)
             for r in range(2)]
    for lo in ranks:
        lo.load_state_dict(state)
    x0, x1 = next(iter(ranks[0]))[0], next(iter(ranks[1]))[0]
    assert torch.equal(torch.cat([x0, x1]), expected[0][0])
    bad = {**state, "offset": 10**6}
    with pytest.raises(ValueError, match="out of range"):
        make().load_state_dict(bad)


def test_validation_pass_scores_every_token_once(long_doc_shards):
    loader = PackedLoader(long_doc_shards, "val", batch_size=4, seq_len=32, loop=False)
    batches = list(loader)
    predicted = sum(int((y >= 0).sum()) for _, y in batches)
    assert predicted == loader.split_tokens - 1  # every token but the first has its prediction scored
    assert [torch.equal(a[1], b[1]) for a, b in zip(batches, loader)] == [True] * len(batches)  # repeatable


# ------------------------------------------------------------------------------------------------- peak table


def test_peak_table_states_what_each_card_can_do():
    assert M.cuda_peak_flops("NVIDIA GeForce RTX 3090") == 71e12  # bf16, dense, fp32 accumulate (GA102 whitepaper)
    assert M.cuda_peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    assert M.cuda_peak_flops("NVIDIA H100 PCIe") == 756e12 and M.cuda_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    # Volta and Turing have no bf16 tensor cores: no bf16 peak, an fp16 one, and the advice says what to do
    for name, fp16 in (("Tesla V100-SXM2-16GB", 125e12), ("Tesla T4", 65e12)):
        assert M.cuda_peak_flops(name) is None and M.cuda_peak_flops(name, torch.float16) == fp16
        peak, source = M.describe_cuda_peak(name, torch.bfloat16)
        assert peak is None and "fp16 with a gradient scaler" in source
    # a card missing from the table: no peak, no MFU, and a reason instead of a crash
    peak, source = M.describe_cuda_peak("NVIDIA Imaginary X1", torch.bfloat16)
    assert peak is None and "not reported" in source
    assert M.cuda_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) is None  # fp32 has no tensor-core figure here


def test_gpu_check_summary_survives_a_card_missing_from_the_table(micro_trained, tmp_path):
    """scripts/gpu_check.sh's summary, on a real run's metrics with the peak an unknown card gets (None)."""
    ckpt, _ = micro_trained
    rows = [json.loads(line) for line in (Path(ckpt).parents[1] / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if r.get("event") == "start":
            r.update(peak_flops=None, peak_source="NVIDIA Imaginary X1 (no bfloat16 peak in the table)")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_summary.py"), str(metrics)],
                         capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    assert summary["mfu"] is None and summary["tokens_per_sec_median"] > 0


def test_pretraining_and_sft_dispatch_to_fused_attention_on_cpu():
    """The checker gpu_check.sh runs on the GPU, run here on the CPU: neither path may use SDPA's math kernel."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_attention_kernels.py"), "--device", "cpu",
                          "--preset", "test-micro", "--batch-size", "2"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    for path in ("pretrain", "sft"):
        assert report[path]["fused"] and not report[path]["math"], report


def test_1b_recipe_states_its_true_size():
    """recipes/1b-fsdp.yaml's first line names the parameter count; the model it builds has exactly that many."""
    from kfoundry.config import resolve

    recipe = ROOT / "recipes" / "1b-fsdp.yaml"
    label = re.search(r"\(([\d,]+):", recipe.read_text().splitlines()[0]).group(1)
    cfg = resolve(recipe=recipe)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert model.num_params() == int(label.replace(",", "")) and f"{model.num_params() / 1e9:.3f}B" == "0.946B"
