"""Stage 7, SFT: fine-tune the freshly pretrained model on the starter chat set, and show the difference.

    pretrained ckpt --(chat answers: before)--> sft on `starter` (RUN/sft/) --(chat answers: after)--> report

The same questions are asked before and after, rendered with the chat template and decoded greedily, so the only
difference between the two answers is the fine-tuning. Before SFT a base model has never seen the chat format: it
rambles on past the end of the turn. After SFT it answers in the format and stops at its end-of-turn token.

Budget: three passes over the starter set (~430 conversations, ~29k tokens), capped at `SFT_MINUTES` of training,
so the stage stays short on a laptop whatever the preset.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kfoundry.checkpoint import load_model, load_tokenizer
from kfoundry.config import RunConfig, from_dict
from kfoundry.model.generate import SamplingParams, generate
from kfoundry.post.chat_format import prompt_ids
from kfoundry.post.sft import SFT_DEFAULTS, sft
from kfoundry.speedrun.stage import Section

CHAT_PROMPTS = [
    ("ko", "대한민국 헌법 제1조는 무엇을 정하고 있나요?"),
    ("ko", "너는 누구야?"),
    ("en", 'Briefly explain The "break" statement in Python.'),
]
SFT_EPOCHS = 3.0
SFT_MINUTES = 0.75


def chat_answers(ckpt: str | Path, prompts: list[str], max_new_tokens: int = 48) -> list[dict[str, Any]]:
    """Greedy single-turn answers: the text, and whether the model ended its turn by itself."""
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    out = []
    for p in prompts:
        ids = prompt_ids(tok, [{"role": "user", "content": p}])
        n = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
        if n <= 0:
            out.append({"text": "(the question is longer than the model's context)", "ended_turn": False})
            continue
        new = generate(model, [ids], SamplingParams(max_new_tokens=n, temperature=0.0),
                       stop_ids={tok.eot_id, tok.eos_id}, pad_id=tok.pad_id)[0]
        # a stop token is not returned, so a row that stopped has fewer than n new tokens
        out.append({"text": tok.decode(new), "ended_turn": len(new) < n})
    return out


def run(pretrained: str | Path, run_dir: Path, cfg: RunConfig, progress: bool = True) -> Section:
    """SFT into RUN/sft. Fields: `sft` (losses, steps, checkpoint, data) and `chat_samples` (before/after)."""
    prompts = [p for _, p in CHAT_PROMPTS]
    before = chat_answers(pretrained, prompts)
    tc = copy.deepcopy(cfg.train)  # the run's batch shape, device and seed; fine-tuning settings on top
    from_dict(tc, {**SFT_DEFAULTS, "max_minutes": SFT_MINUTES, "eval_every": None, "ckpt_every": None,
                   "keep_last": 1, "log_every": 5})
    summary = sft(pretrained, ["starter"], run_dir / "sft", tc, epochs=SFT_EPOCHS, resume="auto", progress=progress)
    after = chat_answers(summary["checkpoint"], prompts)
    samples = [{"lang": lang, "prompt": p, "before": b["text"], "before_ended_turn": b["ended_turn"],
                "after": a["text"], "after_ended_turn": a["ended_turn"]}
               for (lang, p), b, a in zip(CHAT_PROMPTS, before, after)]
    fields = {k: summary.get(k) for k in ("step", "first_loss", "final_loss", "val_loss", "checkpoint",
                                          "train_seconds")}
    report = {"sft": {**fields, "data": summary["data"]}, "chat_samples": samples}
    return Section(report, markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """The "Chat before and after SFT" section: SFT numbers and each question's answer before and after."""
    sft_fields = report.get("sft") or {}
    samples = report.get("chat_samples") or []
    if not sft_fields and not samples:
        return ""

    def num(v):
        return f"{v:.4f}" if isinstance(v, float) else "n/a"

    lines = ["", "## Chat before and after SFT", "",
             f"Fine-tuned on the starter chat set for {sft_fields.get('step')} steps: training loss on assistant "
             f"tokens {num(sft_fields.get('first_loss'))} -> {num(sft_fields.get('final_loss'))}, validation loss "
             f"{num(sft_fields.get('val_loss'))}. Checkpoint: `{sft_fields.get('checkpoint')}`.", ""]
    for s in samples:
        lines += [f"**{s['lang']}** user: `{s['prompt']}`", "",
                  f"before SFT{'' if s['before_ended_turn'] else ' (did not end its turn)'}:", "", "```text",
                  s["before"], "```",
                  f"after SFT{'' if s['after_ended_turn'] else ' (did not end its turn)'}:", "", "```text",
                  s["after"], "```", ""]
    lines += [f"Try it: `kfoundry chat --model {sft_fields.get('checkpoint')}`", ""]
    return "\n".join(lines)
