"""DPO: the loss and rewards on hand-computed numbers, reward accuracy above 0.9 on a small synthetic preference set,
a reference that stays frozen (its log-probabilities are computed once, cached, and match a fresh computation)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from kfoundry import checkpoint as ckpt_io
from kfoundry.cli import main
from kfoundry.fileio import sha256_file
from kfoundry.post import dpo as D
from kfoundry.post.data import load_preferences

CHOSEN = ["네, 기꺼이 도와드릴게요! 😀", "Sure, happy to help! 🎉"]
REJECTED = ["No.", "싫어요."]
# 24 different questions, one pair each: the 6 held out are questions the policy never trained on.
QUESTIONS = ["대한민국 헌법 제1조는?", "What is 2 + 3?", "오늘 날씨 어때?", "How do I print in Python?",
             "\u1112\u1161\u11ab\u1100\u1173\u11af은 누가 만들었어?", "가격은 12,345원인가요?", "Tell me a joke 😀",
             "서울의 인구는?", "What does break do?", "한강은 어디에 있어?", "Who are you?", "몇 시야?",
             "김치찌개는 어떻게 끓여?", "What is 7 x 8?", "내일 비 와?", "How do I sort a list?", "부산까지 몇 km야?",
             "Recommend a book 📚", "이 노래 제목이 뭐야? 🎵", "What does return do?", "제주도에 가 볼 만한 곳은?",
             "Where is Mount Everest?", "오늘 며칠이야?", "Can you count to 10?"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    """A random test-micro-sized checkpoint (conftest; read-only) and the preference pairs."""
    prefs = [{"prompt": q, "chosen": CHOSEN[i % 2], "rejected": REJECTED[(i // 2) % 2]}
             for i, q in enumerate(QUESTIONS)]
    data = tmp_path_factory.mktemp("dpo") / "prefs.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prefs), encoding="utf-8")
    base, tok = tiny_checkpoint((QUESTIONS + CHOSEN + REJECTED) * 30, 400)
    return base, data, tok


def test_loss_and_rewards_by_hand():
    policy = torch.tensor([[-1.0, -3.0], [-2.0, -1.0]])
    reference = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    t = D.dpo_terms(policy, reference, beta=0.5)
    # pair 1: rewards +0.5 / -0.5, margin 1; pair 2: rewards 0 / +0.5, margin -0.5
    assert float(t["reward_margin"]) == pytest.approx(0.25)
    assert float(t["reward_acc"]) == 0.5
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert float(t["loss"]) == pytest.approx(expected)
    # policy = reference: every margin is 0, loss log 2, no pair counted as won
    same = D.dpo_terms(reference, reference, beta=0.1)
    assert float(same["loss"]) == pytest.approx(math.log(2)) and float(same["reward_acc"]) == 0.0


def test_reply_mask_excludes_earlier_assistant_turns(setup):
    _, _, tok = setup
    prompt = [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요"},
              {"role": "user", "content": "2+3?"}]
    ex = D.encode_reply(tok, prompt, "5 😀")
    assert [t for t, m in zip(ex.ids, ex.mask) if m] == tok.encode("5 😀") + [tok.eot_id]


def test_dpo_raises_reward_accuracy_with_a_frozen_reference(setup, tmp_path):
    base, data, tok = setup
    base_sha = sha256_file(base / "model.safetensors")
    tc = D.dpo_train_config("test-micro", ["train.lr=2e-3", "train.max_steps=30", "train.micro_batch_size=6",
                                           "train.eval_every=15", "train.ckpt_every=15", "train.log_every=5"])
    logs = []
    summary = D.dpo(base, [data], tmp_path / "run", tc, beta=0.1, val_fraction=0.25, progress=False, log=logs.append)
    assert summary["data"] == {"train_pairs": 18, "val_pairs": 6, "kept": 24, "refused": {}}
    final = ckpt_io.load_model(summary["checkpoint"])
    prefs = load_preferences(data)
    cache = load_file(str(tmp_path / "run" / D.CACHE_FILE))["logps"]
    assert cache.shape == (24, 2)

    # the reference is frozen: its checkpoint is untouched and the cached log-probs are what it computes now
    assert sha256_file(base / "model.safetensors") == base_sha
    train_prefs, val_prefs = D.split_prefs(prefs, 0.25, tc.seed)
    assert len(val_prefs) == 6 and not {str(p.prompt) for p in val_prefs} & {str(p.prompt) for p in train_prefs}
    order = D.encode_pairs(tok, train_prefs, 64) + D.encode_pairs(tok, val_prefs, 64)
    fresh = D.pair_logps(ckpt_io.load_model(base), order, 8, tok.pad_id, "cpu")
    assert torch.allclose(cache, fresh, atol=1e-4)
    # ... while the policy moved
    policy = D.pair_logps(final, order, 8, tok.pad_id, "cpu")
    assert (policy - fresh).abs().max() > 1.0

    # reward accuracy > 0.9 on the training pairs and on the held-out ones, with a positive margin
    train_m = D.preference_metrics(final, order[:18], cache[:18], 0.1, 8, tok.pad_id, "cpu")
    assert train_m["reward_acc"] > 0.9 and train_m["reward_margin"] > 0
    assert summary["eval"]["val_reward_acc"] > 0.9 and summary["eval"]["val_reward_margin"] > 0
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "reward_acc" in m]
    assert logged and all("reward_margin" in m and "chosen_reward" in m for m in logged)
    assert logged[-1]["reward_acc"] > logged[0]["reward_acc"] or logged[0]["reward_acc"] == 1.0
    meta = ckpt_io.read_meta(summary["checkpoint"])
    assert meta["stage"] == "dpo" and meta["beta"] == 0.1 and meta["parent"] == str(base.resolve())
    assert any("cached in" in m and "of 24 pairs" in m for m in logs)

    # resuming reuses the cache instead of running the reference again
    logs.clear()
    D.dpo(base, [data], tmp_path / "run", tc, beta=0.1, val_fraction=0.25, resume="auto", progress=False,
          log=logs.append)
    assert any(m.startswith("reference log-probabilities: cached") for m in logs)


def test_nothing_fits_is_a_clear_error(setup, tmp_path):
    base, data, _ = setup
    logs = []
    with pytest.raises(ValueError, match=r"no preference pair fits train.seq_len=4 \(kept 0, refused 24 "
                                         r"\(too_long=24\)\)"):
        D.dpo(base, [data], tmp_path / "x", D.dpo_train_config("test-micro", ["train.seq_len=4"]), progress=False,
              log=logs.append)
    assert logs == ["dpo data: 0 training / 0 validation pairs; kept 0, refused 24 (too_long=24)"]


def test_cli_reports_reward_accuracy(setup, tmp_path, capsys):
    base, data, _ = setup
    rc = main(["dpo", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress",
               "--preset", "test-micro", "--set", "train.max_steps=2", "--beta", "0.2"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 2 and 0 <= out["train_reward_acc"] <= 1 and "val_reward_acc" in out
    assert main(["dpo", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "p"), "--beta", "0"]) == 2
    assert "beta must be positive" in capsys.readouterr().err
