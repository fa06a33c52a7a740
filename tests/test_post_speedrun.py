"""The speedrun's SFT stage (kfoundry/speedrun/sft.py): fine-tunes on the starter chat set and reports answers before and after."""

from __future__ import annotations

import pytest

from kfoundry.checkpoint import save_checkpoint
from kfoundry.config import resolve
from kfoundry.model.llama import Transformer
from kfoundry.speedrun import sft as sft_stage
from kfoundry.speedrun.sft import CHAT_PROMPTS
from kfoundry.tokenizer import KTokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def test_sft_stage_reports_before_and_after(micro_data, tmp_path):
    cfg = resolve("test-micro")
    tok = KTokenizer.load(micro_data[0])  # conftest's shared test-micro tokenizer
    base = save_checkpoint(tmp_path / "ckpt" / "step-000000", Transformer.build(cfg.model, seed=0), tok)
    section = sft_stage.run(base, tmp_path, cfg, progress=False)
    fields = section.fields

    sft = fields["sft"]
    assert sft["step"] > 0 and sft["final_loss"] < sft["first_loss"]
    assert sft["checkpoint"].startswith(str(tmp_path / "sft" / "ckpt"))
    assert sft["data"]["train_conversations"] > 20  # the short starter conversations fit test-micro's 64 tokens
    assert sft["data"]["refused"].get("too_long", 0) > 0  # the rest are counted, not cut
    samples = fields["chat_samples"]
    assert [s["prompt"] for s in samples] == [p for _, p in CHAT_PROMPTS]
    assert {s["lang"] for s in samples} == {"ko", "en"}
    assert all(isinstance(s["before"], str) and isinstance(s["after"], str) for s in samples)

    text = section.markdown
    assert text.startswith("\n## Chat before and after SFT")
    assert text.count("\nbefore SFT") == 3 and text.count("\nafter SFT") == 3 and CHAT_PROMPTS[0][1] in text
    assert f"kfoundry chat --model {sft['checkpoint']}" in text
