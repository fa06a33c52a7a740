"""`kfoundry export hf`: the exported directory loads in transformers offline and matches our model exactly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_hf_logits_match
from kfoundry.checkpoint import load_model, save_checkpoint
from kfoundry.cli import main
from kfoundry.config import ModelConfig
from kfoundry.model.llama import Transformer
from kfoundry.text import nfc

TRAIN_TEXT = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "모든 국민은 법 앞에 평등하다. 누구든지 성별·종교 또는 사회적 신분에 의하여 차별을 받지 아니한다.",
    "The quick brown fox jumps over the lazy dog. Python is a programming language.",
    "In 2026, 12,345 people 😀 visited Seoul; 오늘 날씨 좋네요 🎉",
] * 20

CONFIGS = {
    "gqa-tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, tie_embeddings=True),
    "mha-untied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128, tie_embeddings=False),
    "mqa-untied-theta": dict(dim=48, n_layers=3, n_heads=3, n_kv_heads=1, ffn_dim=96, tie_embeddings=False,
                             rope_theta=500000.0, norm_eps=1e-6),
}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer(TRAIN_TEXT, 400)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tok, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=128, **CONFIGS[request.param])
    model = Transformer.build(cfg, seed=0)
    with torch.no_grad():  # make the norms non-trivial so a mis-mapped norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ckpt = save_checkpoint(base / "ckpt", model, tok)
    out = base / "hf"
    assert main(["export", "hf", "--model", str(ckpt), "--out", str(out)]) == 0
    return ckpt, out


def test_logits_match_within_1e5(exported, tok, mixed_texts):
    ckpt, out = exported
    hf = assert_hf_logits_match(ckpt, out, tok, mixed_texts)
    assert type(hf).__name__ == "LlamaForCausalLM"


def test_token_ids_and_chat_template_agree(exported, tok, mixed_texts):
    from transformers import AutoTokenizer

    _, out = exported
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in mixed_texts:
        assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True), text
        assert hf_tok.decode(tok.encode(text), skip_special_tokens=True) == nfc(text)
    msgs = [{"role": "system", "content": "친절하게 답하세요."}, {"role": "user", "content": "안녕하세요? 😀"}]
    rendered = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "안녕하세요? 😀" in rendered and rendered.startswith(hf_tok.bos_token)
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.pad_token_id == tok.pad_id
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.eot_id in gen["eos_token_id"]


def test_generation_matches_transformers_greedy(exported, tok):
    from transformers import AutoModelForCausalLM

    from kfoundry.model.generate import SamplingParams, generate

    ckpt, out = exported
    ours = load_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    prompt = tok.encode("대한민국은", bos=True)
    mine = generate(ours, [prompt], SamplingParams(max_new_tokens=12))[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert mine == theirs[: len(mine)] and len(mine) > 0


def test_qk_norm_model_is_refused(tok, tmp_path):
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=32, qk_norm=True)
    ckpt = save_checkpoint(tmp_path / "ckpt", Transformer.build(cfg, seed=0), tok)
    assert main(["export", "hf", "--model", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()  # nothing half-written
    assert main(["export", "hf", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "hf2")]) == 2
