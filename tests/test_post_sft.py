"""SFT: packing is exact (no attention across conversations), loss only on assistant tokens, the loop learns a tiny
set to near-zero loss, validation loss, the pretraining checkpoint layout, exact resume, and clear CLI errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kfoundry import checkpoint as ckpt_io
from kfoundry.cli import main
from kfoundry.post import sft as S
from kfoundry.post.data import LoadStats
from kfoundry.train.loop import list_checkpoints

CHATS = [
    [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요! 😀"}],
    [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5입니다."}],
    [{"role": "system", "content": "Answer in English."},
     {"role": "user", "content": "\u1112\u1161\u11ab\u1100\u1173\u11af?"},  # NFD "한글"
     {"role": "assistant", "content": "Hangul, 1443 🎉"}],
    [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요! 😀"},
     {"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5입니다."}],
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


FAST = ["train.lr=1e-2", "train.warmup_steps=5", "train.log_every=5", "train.micro_batch_size=4"]


@pytest.fixture(scope="module")
def base(tiny_checkpoint, tmp_path_factory):
    """A tokenizer and a randomly initialised test-micro-sized checkpoint (conftest; read-only), and the chats."""
    texts = [m["content"] for c in CHATS for m in c] + ["The quick brown fox.", "대한민국은 민주공화국이다. 12,345원"]
    ckpt, tok = tiny_checkpoint(texts * 40, 400)
    data = tmp_path_factory.mktemp("sft") / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in CHATS), encoding="utf-8")
    return ckpt, data, tok


def test_packed_rows_compute_each_conversation_alone(base):
    ckpt, _, tok = base
    model = ckpt_io.load_model(ckpt).eval()
    examples = S.encode_chats(tok, CHATS, seq_len=64)
    rows = S.pack(examples, seq_len=64)
    assert len(rows) < len(examples)  # several conversations share a row
    assert all(sum(len(e.ids) - 1 for e in row) <= 64 for row in rows)
    batch = S.collate(rows, tok.pad_id)
    with torch.no_grad():
        packed = model(batch.x, positions=batch.positions.clamp(min=0), attn_mask=batch.attn_mask)
    for b, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex.ids) - 1
            with torch.no_grad():
                alone = model(torch.tensor([ex.inputs]))[0]
            assert torch.allclose(packed[b, at:at + n], alone, atol=1e-5), "attention leaked across conversations"
            # targets: only assistant tokens (the next token's mask), -1 elsewhere
            assert batch.y[b, at:at + n].tolist() == [t if m else -1 for t, m in zip(ex.ids[1:], ex.mask[1:])]
            at += n
        assert (batch.y[b, at:] == -1).all() and (batch.positions[b, at:] == -1).all()
    # the loss counts assistant tokens only: each reply and its end-of-turn token, nothing else
    replies = [m["content"] for c in CHATS for m in c if m["role"] == "assistant"]
    assert batch.n_targets == sum(len(tok.encode(r)) + 1 for r in replies)


def test_long_conversations_are_counted_not_truncated(base):
    _, _, tok = base
    stats = LoadStats(kept=3)
    long = [{"role": "user", "content": "긴 질문 " * 40}, {"role": "assistant", "content": "네"}]
    out = S.encode_chats(tok, [CHATS[0], long, CHATS[1]], seq_len=64, stats=stats)
    assert len(out) == 2 and stats.kept == 2 and stats.bad["too_long"] == 1


def test_nothing_fits_is_a_clear_error(base, tmp_path):
    ckpt, data, _ = base
    logs = []
    with pytest.raises(ValueError, match=r"no training conversation fits train.seq_len=4 \(kept 0, refused 8 "
                                         r"\(too_long=8\)\)"):  # the 4 chats, read as data and as val_data
        S.sft(ckpt, [data], tmp_path / "x", S.sft_train_config("test-micro", ["train.seq_len=4"]), val_data=[data],
              progress=False, log=logs.append)
    assert logs == ["sft data: 0 training / 0 validation conversations; kept 0, refused 8 (too_long=8)"]


def test_sft_learns_tiny_set_to_near_zero_loss(base, tmp_path):
    ckpt, data, tok = base
    tc = S.sft_train_config("test-micro", [*FAST, "train.max_steps=50", "train.eval_every=25",
                                           "train.ckpt_every=25"])
    summary = S.sft(ckpt, [data], tmp_path / "run", tc, val_data=[data], progress=False, log=lambda m: None)
    assert summary["first_loss"] > 3.0
    assert summary["final_loss"] < 0.05, summary["final_loss"]
    assert summary["val_loss"] is not None and summary["val_loss"] < 0.05  # here the held-out set is the same data
    final = tmp_path / "run" / "ckpt" / "step-000050"
    assert summary["checkpoint"] == str(final)
    ckpt_io.verify(final)
    for name in ("config.json", "model.safetensors", "tokenizer/tokenizer.json", "trainer_state.json",
                 "optimizer.pt", "meta.json", "manifest.json"):
        assert (final / name).is_file(), name
    meta = ckpt_io.read_meta(final)
    assert meta["stage"] == "sft" and meta["parent"] == str(ckpt.resolve()) and meta["final"] is True
    assert ckpt_io.load_tokenizer(final).hash == tok.hash
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [25, 50]

    # the fine-tuned model answers in the chat format and stops at the end of its turn
    from kfoundry.model.generate import SamplingParams, generate
    from kfoundry.post.chat_format import prompt_ids

    model = ckpt_io.load_model(final)
    out = generate(model, [prompt_ids(tok, CHATS[1][:1])], SamplingParams(max_new_tokens=20),
                   stop_ids={tok.eot_id}, pad_id=tok.pad_id)[0]
    assert tok.decode(out) == "5입니다."


def test_resume_continues_bit_for_bit(base, tmp_path):
    ckpt, data, _ = base
    over = [*FAST, "train.max_steps=8", "train.ckpt_every=4", "train.keep_last=5", "train.eval_every=100"]
    S.sft(ckpt, [data], tmp_path / "a", S.sft_train_config("test-micro", over), val_fraction=0.25, progress=False,
          log=lambda m: None)
    steps = list_checkpoints(tmp_path / "a" / "ckpt")
    assert [p.name for p in steps] == ["step-000004", "step-000008"]
    # simulate a run killed after its step-4 checkpoint, then resumed
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "ckpt" / "step-000008")
    logs = []
    summary = S.sft(ckpt, [data], tmp_path / "b", S.sft_train_config("test-micro", over), val_fraction=0.25,
                    resume="auto", progress=False, log=logs.append)
    assert any("resumed from" in m and "step 4" in m and "(sft)" in m for m in logs)
    a = load_file(str(steps[-1] / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "ckpt" / "step-000008" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary["step"] == 8
    # different data: resume refuses instead of mixing two datasets
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"messages": CHATS[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="training data changed"):
        S.sft(ckpt, [other], tmp_path / "b", S.sft_train_config("test-micro", over), resume="auto",
              progress=False, log=lambda m: None)


def test_muon_sft_resumes_bit_for_bit(base, tmp_path):
    """`--set train.optimizer=muon` in SFT goes through the one engine: Muon's momentum is saved with the checkpoint
    and a run resumed from its step-3 checkpoint ends on the same bits as the uninterrupted run."""
    ckpt, data, _ = base
    over = [*FAST, "train.optimizer=muon", "train.muon_lr=0.02", "train.max_steps=6", "train.ckpt_every=3",
            "train.keep_last=5", "train.eval_every=100"]
    S.sft(ckpt, [data], tmp_path / "a", S.sft_train_config("test-micro", over), val_fraction=0.25, progress=False,
          log=lambda m: None)
    steps = list_checkpoints(tmp_path / "a" / "ckpt")
    assert [p.name for p in steps] == ["step-000003", "step-000006"]
    state = ckpt_io.load_optimizer_state(steps[0])["state"]
    assert sum("momentum_buffer" in s for s in state.values()) == 7 * 2  # Muon on 7 matrices x 2 layers
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "ckpt" / "step-000006")
    summary = S.sft(ckpt, [data], tmp_path / "b", S.sft_train_config("test-micro", over), val_fraction=0.25,
                    resume="auto", progress=False, log=lambda m: None)
    assert summary["step"] == 6
    a = load_file(str(steps[-1] / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "ckpt" / "step-000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained


def test_cli_errors_are_one_line(base, tmp_path, capsys):
    ckpt, data, _ = base
    assert main(["sft", "--model", str(ckpt), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert main(["sft", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress",
                 "--set", "model.dim=8"]) == 2
    assert "only train.* settings" in capsys.readouterr().err
    assert main(["sft", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
