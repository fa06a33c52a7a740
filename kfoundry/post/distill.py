"""Knowledge distillation: train a small student on a large teacher's predictions (Hinton et al. 2015).

A language model trained on text sees one right answer per position: the token that came next. A trained
teacher knows more than that -- that after "대한민국의 주권은" the words "국민" and "국가" are both plausible and
"바나나" is not. Distillation hands the student the teacher's whole next-token distribution at every position,
which is a far richer signal per token than the one-hot target, so a small model learns faster from the same
text. Loss per target position:

    loss = (1 - alpha) * CE(student, next token)  +  alpha * T^2 * KL( softmax(teacher / T) || softmax(student / T) )

- T (temperature) > 1 softens both distributions so the small probabilities -- the "dark knowledge" of which
  wrong answers are nearly right -- carry weight. Gradients of the KL term shrink as 1/T^2, hence the T^2
  factor, which keeps the two terms on the same scale whatever T is (Hinton et al., section 2).
- alpha = 0 is ordinary pretraining with the same code, data order, seed and steps: the no-teacher baseline
  the tests and `--alpha 0` compare against.
- Defaults alpha = 0.9, T = 1, from a measurement (docs/benchmarks.md, "Distillation into nano"): a nano student
  of a cpu-tiny teacher after 200 steps reached 1.809 bits per byte with them, 1.869 with alpha 0.5, T 1, and
  1.959 with alpha 0.5, T 2 -- worse than the 1.933 of no teacher at all. A small, young teacher's low
  probabilities are mostly noise, not dark knowledge; softening them further (T > 1) teaches the noise.

Teacher and student must share the tokenizer: the KL compares distributions over the same vocabulary. The
student's `vocab_size` is therefore set to the teacher's. The teacher only runs forward passes, in eval mode
and without gradients.

The loop is the one SFT and DPO use (`PostTrainer`, kfoundry/post/runner.py), fed from the pretraining loader
(PackedLoader) and scored with the pretraining evaluation: the run writes OUT/ckpt/step-N (with trainer_state.json
and optimizer.pt, the last `train.keep_last` kept), OUT/metrics.jsonl and OUT/run_config.json, each checkpoint's
meta.json names the teacher as its parent, and `resume="auto"` (`--resume auto`) continues a stopped run to the
same weights as an uninterrupted one: the loader's position is saved with each checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kfoundry import checkpoint as ckpt_io
from kfoundry.config import RunConfig
from kfoundry.fileio import sha256_file
from kfoundry.model.llama import Transformer
from kfoundry.post.runner import PostTrainer
from kfoundry.train import loop


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                 alpha: float, temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over target positions (targets >= 0) of the blended loss above; also returns both parts."""
    keep = targets.reshape(-1) >= 0
    s = student_logits.float().reshape(-1, student_logits.size(-1))[keep]
    y = targets.reshape(-1)[keep]
    ce = F.cross_entropy(s, y)
    if alpha == 0:
        return ce, {"ce": ce.item(), "kl": 0.0}
    t = teacher_logits.float().reshape(-1, teacher_logits.size(-1))[keep]
    # KL(p_teacher || p_student) = sum p_t (log p_t - log p_s), averaged over positions ("batchmean").
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean")
    loss = (1 - alpha) * ce + alpha * temperature**2 * kl
    return loss, {"ce": ce.item(), "kl": kl.item()}


def check_settings(alpha: float, temperature: float) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def inputs_sha256(shard_dir: Path, teacher: Path) -> str:
    """A fingerprint of what the student learns from, the token shards and the teacher's weights (through their
    manifests, which hold the file hashes): resume refuses to continue a run on different ones."""
    h = hashlib.sha256()
    for f in (shard_dir / "meta.json", teacher / "manifest.json"):
        h.update(sha256_file(f).encode() if f.is_file() else b"-")
    return h.hexdigest()


def distill(teacher: str | Path, cfg: RunConfig, out_dir: str | Path, *, shard_dir: str | Path,
            alpha: float = 0.9, temperature: float = 1.0, resume: str | None = None, progress: bool = True,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """Train a fresh student shaped by `cfg.model` on shards of the teacher's tokenizer; returns a summary.

    `resume="auto"` continues from the newest complete checkpoint under OUT/ckpt (or a fresh student if none).
    The summary holds the final checkpoint path, the student's and the teacher's validation loss and bits per
    byte (`eval`, `teacher_eval`; per language where the shards have several), parameter counts and tokens/s.
    """
    from kfoundry.data.loader import PackedLoader

    check_settings(alpha, temperature)
    out_dir, shard_dir, teacher = Path(out_dir), Path(shard_dir), Path(teacher)
    tc = cfg.train
    device = loop.pick_device(tc.device)

    teacher_model = ckpt_io.load_model(teacher, device=device).eval()
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    tok = ckpt_io.load_tokenizer(teacher)
    if cfg.model.vocab_size != teacher_model.cfg.vocab_size:
        log(f"student vocab_size set to the teacher's ({teacher_model.cfg.vocab_size}): they share a tokenizer")
        cfg.model.vocab_size = teacher_model.cfg.vocab_size
    for who, m in (("student", cfg.model), ("teacher", teacher_model.cfg)):
        if tc.seq_len > m.max_seq_len:
            raise ValueError(f"train.seq_len={tc.seq_len} exceeds the {who}'s max_seq_len={m.max_seq_len}")

    loader = PackedLoader(shard_dir, split="train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                          seed=tc.seed, expect_tokenizer_hash=tok.hash)
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.long, device=device)
    accum = max(1, math.ceil(tc.tokens_per_step / (tc.micro_batch_size * tc.seq_len))) if tc.tokens_per_step else 1

    def evaluate(model) -> dict[str, float]:
        result: dict[str, float] = {}
        for lang in [None, *loop._val_languages(shard_dir)]:
            r = loop.evaluate(model, shard_dir, cfg, token_bytes, device, lang=lang)
            if r is not None:
                suffix = f"_{lang}" if lang else ""
                result[f"val_loss{suffix}"], result[f"val_bpb{suffix}"] = r["loss"], r["bpb"]
        return result

    teacher_eval = evaluate(teacher_model)  # the yardstick, recorded in every checkpoint's meta.json
    trainer = PostTrainer("distill", teacher, out_dir, tc, resume=resume, data_sha256=inputs_sha256(shard_dir, teacher),
                          data_spec=str(shard_dir), progress=progress, log=log,
                          meta={"alpha": alpha, "temperature": temperature, "teacher_eval": teacher_eval},
                          build_model=lambda dev: Transformer.build(cfg.model, device=dev, seed=tc.seed),
                          stream=loader)  # a resumed trainer has put the loader back where the checkpoint left it
    student = trainer.model
    batches = iter(loader)  # the loader's state advances as batches are drawn

    def train_step(_: None) -> dict[str, float]:
        """One optimizer step's gradients, accumulated over `accum` micro-batches drawn from the loader."""
        parts = {"ce": 0.0, "kl": 0.0}
        loss_sum, targets = 0.0, 0
        for _ in range(accum):
            x, y = (t.to(device) for t in next(batches))
            with torch.no_grad(), loop.autocast(device):
                t_logits = teacher_model(x) if alpha > 0 else None
            with loop.autocast(device):
                loss, p = distill_loss(student(x), t_logits, y, alpha=alpha, temperature=temperature)
            (loss / accum).backward()
            loss_sum += loss.item() / accum
            parts = {k: parts[k] + p[k] / accum for k in parts}
            targets += int((y >= 0).sum())
        return {"loss": loss_sum, **parts, "tokens": targets}

    summary = trainer.fit(None, train_step, lambda: evaluate(student))
    return {**summary, "teacher_eval": teacher_eval, "alpha": alpha, "temperature": temperature,
            "params": student.num_params(), "teacher_params": teacher_model.num_params(),
            "tokens_per_sec": loop._median_tps(out_dir)}
