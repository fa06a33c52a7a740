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
- Defaults alpha = 0.9, T = 1, from a measurement (docs/benchmarks.md, "Distillation into nano", with its
  command): a nano student of a cpu-tiny teacher did best with them, worse with alpha 0.5, and worse than no
  teacher at all with T = 2. A small, young teacher's low probabilities are mostly noise, not dark knowledge;
  softening them further (T > 1) teaches the noise.

Teacher and student must share the tokenizer: the KL compares distributions over the same vocabulary. The
student's `vocab_size` is therefore set to the teacher's. The teacher only runs forward passes, in eval mode
and without gradients.

The loop is the one training engine every stage uses (kfoundry/train/trainer.py), fed from the pretraining loader
(PackedLoader) and scored with the pretraining evaluation, on one process or under torchrun (`--nproc N`): the run writes OUT/ckpt/step-N (with trainer_state.json
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

from kfoundry.checkpoint import load_config, load_model, load_tokenizer
from kfoundry.config import RunConfig, complete, validate_options
from kfoundry.data.loader import PackedLoader
from kfoundry.errors import ConfigError
from kfoundry.fileio import sha256_file
from kfoundry.model.llama import Transformer
from kfoundry.post.runner import open_post_run
from kfoundry.train.distributed import prepare_frozen, shutdown
from kfoundry.train.evaluation import evaluate_by_language
from kfoundry.train.trainer import LoaderSource, Stage, StepLoss, Trainer


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor, *,
                 alpha: float, temperature: float, reduction: str = "mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The blended loss above over target positions (targets >= 0), as a mean or a sum; also returns both parts
    (detached, same reduction). No host sync: the training engine reads the numbers once per step."""
    keep = targets.reshape(-1) >= 0
    s = student_logits.float().reshape(-1, student_logits.size(-1))[keep]
    y = targets.reshape(-1)[keep]
    ce = F.cross_entropy(s, y, reduction=reduction)
    if alpha == 0 or teacher_logits is None:
        return ce, {"ce": ce.detach(), "kl": torch.zeros((), device=ce.device)}
    t = teacher_logits.float().reshape(-1, teacher_logits.size(-1))[keep]
    # KL(p_teacher || p_student) = sum p_t (log p_t - log p_s), per position; averaged ("batchmean") or summed.
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="sum")
    if reduction == "mean":
        kl = kl / max(1, s.shape[0])
    loss = (1 - alpha) * ce + alpha * temperature**2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


def check_settings(alpha: float, temperature: float) -> None:
    validate_options("distill", {"alpha": alpha, "temperature": temperature})


def inputs_sha256(shard_dir: Path, teacher: Path) -> str:
    """A fingerprint of what the student learns from, the token shards and the teacher's weights (through their
    manifests, which hold the file hashes): resume refuses to continue a run on different ones."""
    h = hashlib.sha256()
    for f in (shard_dir / "meta.json", teacher / "manifest.json"):
        h.update(sha256_file(f).encode() if f.is_file() else b"-")
    return h.hexdigest()


def teacher_shards(teacher: Path) -> Path | None:
    """The token shards the teacher was trained on, when it sits in a run directory that has them
    (RUN/ckpt/step-N -> RUN/shards): their validation split is the one both models are scored on."""
    run = teacher.resolve().parent.parent
    return run / "shards" if (run / "shards" / "meta.json").is_file() else None


def distill(teacher: str | Path, cfg: RunConfig, out_dir: str | Path, *, shard_dir: str | Path,
            alpha: float = 0.9, temperature: float = 1.0, resume: str | None = None, progress: bool = True,
            explicit: bool = True, allow_change: bool = False,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """Train a fresh student shaped by `cfg.model` on shards of the teacher's tokenizer; returns a summary.

    `resume="auto"` continues from the newest complete checkpoint under OUT/ckpt (or a fresh student if none).
    The summary holds the final checkpoint path, the student's and the teacher's validation loss and bits per
    byte (`eval`, `teacher_eval`; per language where the shards have several), parameter counts and tokens/s.
    Under torchrun every rank calls this; the teacher is sharded like the student (FSDP) or replicated (DDP).
    """
    check_settings(alpha, temperature)
    out_dir, shard_dir, teacher = Path(out_dir), Path(shard_dir), Path(teacher)
    tok = load_tokenizer(teacher)
    teacher_cfg = load_config(teacher)
    if cfg.model.vocab_size != teacher_cfg.vocab_size:
        log(f"student vocab_size set to the teacher's ({teacher_cfg.vocab_size}): they share a tokenizer")
        cfg.model.vocab_size = teacher_cfg.vocab_size
    complete(cfg, stage="distill")  # the student's rules (config.validate); the teacher must also see whole rows:
    if cfg.train.seq_len > teacher_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds the teacher's max_seq_len="
                          f"{teacher_cfg.max_seq_len}")
    info, run, cfg, options = open_post_run(
        "distill", out_dir, cfg, {"alpha": alpha, "temperature": temperature}, resume=resume,
        data_sha256=inputs_sha256(shard_dir, teacher), explicit=explicit, allow_change=allow_change, log=log)
    tc, device = cfg.train, info.device
    alpha, temperature = options["alpha"], options["temperature"]
    teacher_model = prepare_frozen(load_model(teacher, device=device), info, tc.parallel)
    loader = PackedLoader(shard_dir, split="train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                          seed=tc.seed, rank=info.rank, world_size=info.world_size, expect_tokenizer_hash=tok.hash)
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.long, device=device)

    def evaluate(model) -> dict[str, float]:
        return evaluate_by_language(model, shard_dir, batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                                    max_batches=tc.eval_batches, token_bytes=token_bytes, device=device, info=info)

    def loss(student, batch) -> StepLoss:
        x, y = batch
        with torch.no_grad():
            t_logits = teacher_model(x) if alpha > 0 else None
        total, parts = distill_loss(student(x), t_logits, y, alpha=alpha, temperature=temperature,
                                    reduction="sum")
        count = (y >= 0).sum()
        return StepLoss(loss=total, count=count, tokens=count, metrics=parts)

    teacher_eval = evaluate(teacher_model)  # the yardstick, recorded in every checkpoint's meta.json
    student = Transformer.build(cfg.model, device=device, seed=tc.seed)
    stage = Stage("distill", loss=loss, source=LoaderSource(loader), evaluate=evaluate, metric_names=("ce", "kl"),
                  flops_per_token=student.flops_per_token(tc.seq_len))
    trainer = Trainer(stage, cfg, out_dir, run=run, model=student, tokenizer=tok, info=info, device=device,
                      parent=str(teacher.resolve()), data_sha256=inputs_sha256(shard_dir, teacher),
                      meta={"alpha": alpha, "temperature": temperature, "teacher_eval": teacher_eval},
                      progress=progress, log=log)
    summary = trainer.fit()
    shutdown(info)
    return {**summary, "teacher_eval": teacher_eval, "alpha": alpha, "temperature": temperature,
            "teacher_params": teacher_model.num_params()}
