"""Direct Preference Optimization (DPO; Rafailov et al. 2023): learn from "this reply is better than that one".

For a prompt x with a chosen reply y_w and a rejected reply y_l, DPO raises the policy's log-probability of y_w
relative to y_l, measured against a frozen reference model (the SFT checkpoint it starts from):

    reward(y)  = beta * (log pi(y | x) - log ref(y | x))          the "implicit reward" of a reply
    loss       = -log sigmoid(reward(y_w) - reward(y_l))

beta sets how far the policy may move from the reference: small beta tolerates large moves, large beta keeps it
close. Logged per step and on validation pairs: the loss, the reward accuracy (the share of pairs whose chosen
reply has the higher reward; 0 at the start, where policy = reference) and the reward margin (mean difference).

Frozen reference, computed once: the reference never changes, so its log-probabilities of every chosen and
rejected reply are computed in one pass before training, cached in OUT/reference_logps.safetensors (with the
hashes of the data and of the reference weights, so a stale cache is never used) and the reference model is then
released. Training holds one model in memory, not two, and a resumed run reuses the cache.

Log-probabilities are summed over the reply's tokens, its end-of-turn token included, exactly the tokens the chat
mask marks (chat_format.render). Pairs are right-padded in a batch: with causal attention, real tokens never see
the padding after them, so no attention mask is needed.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kfoundry.checkpoint import load_config, load_model, load_tokenizer
from kfoundry.config import STAGE_PRESETS, DataConfig, RunConfig, TrainConfig, complete, validate_options
from kfoundry.errors import DataError
from kfoundry.fileio import read_json, sha256_file
from kfoundry.model.llama import Transformer
from kfoundry.post.chat_format import normalize_messages, render_many, render_text
from kfoundry.post.data import LoadStats, Preference, load_preferences, load_split_encode
from kfoundry.post.runner import batches_per_step, derived_max_steps, open_post_run
from kfoundry.post.sft import Example, examples_sha256, post_train_config, split_chats
from kfoundry.train.distributed import DistInfo, prepare_frozen, shutdown
from kfoundry.train.precision import autocast
from kfoundry.train.trainer import EpochSource, Stage, StepLoss, Trainer

# DPO's defaults are the `dpo` stage preset (config.STAGE_PRESETS); kept under this name for code that reads them.
DPO_DEFAULTS: dict[str, Any] = STAGE_PRESETS["dpo"]["train"]
CACHE_FILE = "reference_logps.safetensors"

Pair = tuple[Example, Example]  # (chosen, rejected)


def dpo_train_config(preset_name: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    return post_train_config(preset_name, overrides, "dpo")


def encode_reply(tok, prompt: Sequence[dict], reply: str) -> Example:
    """The conversation prompt + reply, with the mask on the reply's tokens only (not earlier assistant turns)."""
    (ids, mask), = render_many(tok, [[*prompt, {"role": "assistant", "content": reply}]])
    return _reply_example(ids, mask, tok.encode(render_text(tok, normalize_messages(prompt), True)))


def _reply_example(ids: list[int], mask: list[bool], prompt: list[int]) -> Example:
    if ids[:len(prompt)] != prompt:
        raise DataError("the prompt does not tokenize to a prefix of prompt + reply")
    return Example(tuple(ids), tuple(m and i >= len(prompt) for i, m in enumerate(mask)))


def encode_pairs(tok, prefs: Sequence[Preference], seq_len: int, stats: LoadStats | None = None) -> list[Pair]:
    """Tokenize every pair (in one batch); pairs longer than `seq_len` inputs are counted as `too_long`."""
    convs = [[*p.prompt, {"role": "assistant", "content": reply}] for p in prefs for reply in (p.chosen, p.rejected)]
    rendered = render_many(tok, convs)
    prompts = tok.encode_batch([render_text(tok, normalize_messages(p.prompt), True) for p in prefs])
    out = []
    for k, prompt in enumerate(prompts):
        chosen, rejected = _reply_example(*rendered[2 * k], prompt), _reply_example(*rendered[2 * k + 1], prompt)
        if max(len(chosen.ids), len(rejected.ids)) - 1 > seq_len:
            if stats is not None:
                stats.kept -= 1
                stats.reject("too_long")
            continue
        out.append((chosen, rejected))
    return out


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, T] inputs and targets: the B chosen replies, then the B rejected ones, right-padded."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    T = max(len(ex.ids) - 1 for ex in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, ex in enumerate(seqs):
        n = len(ex.ids) - 1
        x[i, :n] = torch.tensor(ex.inputs)
        y[i, :n] = torch.tensor(ex.targets)
    return x, y


def sequence_logps(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over each row's reply tokens: [rows]."""
    logits = model(x)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    return -nll.view(y.shape).sum(-1)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Loss and rewards from [B, 2] (chosen, rejected) log-probabilities of the policy and the reference."""
    rewards = beta * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    return {"loss": -F.logsigmoid(margin).mean(), "reward_acc": (margin > 0).float().mean(),
            "reward_margin": margin.mean(), "chosen_reward": rewards[:, 0].mean(),
            "rejected_reward": rewards[:, 1].mean()}


@torch.no_grad()
def pair_logps(model, pairs: Sequence[Pair], batch_size: int, pad_id: int, device) -> torch.Tensor:
    """[N, 2] log-probabilities (chosen, rejected) of every pair under `model`, in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        x, y = collate_pairs(chunk, pad_id)
        with autocast(device):
            lp = sequence_logps(model, x.to(device), y.to(device)).float().cpu()
        out.append(torch.stack([lp[:len(chunk)], lp[len(chunk):]], dim=1))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def dealt_logps(model, pairs: Sequence[Pair], batch_size: int, pad_id: int, device, info: DistInfo) -> torch.Tensor:
    """[N, 2] log-probabilities of every pair, the work dealt out to the ranks: chunk j of `batch_size` pairs is
    scored by rank j % world, every rank runs the same number of forward passes (a sharded model needs that; a
    rank short of chunks repeats its last one), and the results are all-gathered on the device."""
    chunks = [list(pairs[i:i + batch_size]) for i in range(0, len(pairs), batch_size)]
    if not info.enabled or info.world_size == 1:
        return pair_logps(model, pairs, batch_size, pad_id, device)
    W, r = info.world_size, info.rank
    per_rank = math.ceil(len(chunks) / W)
    mine = [chunks[min(j, len(chunks) - 1)] for j in range(r, per_rank * W, W)]
    out = torch.zeros(per_rank, batch_size, 2, device=info.device)
    for k, chunk in enumerate(mine):
        out[k, :len(chunk)] = pair_logps(model, chunk, batch_size, pad_id, device).to(info.device)
    gathered = torch.zeros(W * per_rank, batch_size, 2, device=info.device)
    torch.distributed.all_gather_into_tensor(gathered, out)
    rows = [gathered[(j % W) * per_rank + j // W, :len(chunk)] for j, chunk in enumerate(chunks)]
    return torch.cat(rows).float().cpu()


def reference_logps(base: Path, pairs: Sequence[Pair], cache: Path, data_sha256: str, batch_size: int, pad_id: int,
                    device, log: Callable[[str], None], info: DistInfo | None = None,
                    parallel: str = "fsdp") -> torch.Tensor:
    """The frozen reference's [N, 2] log-probabilities: from the cache when it matches, else computed (dealt out
    to the ranks under torchrun, the reference sharded like the policy) and cached by rank 0."""
    info = info or DistInfo()
    ref_sha = _weights_sha(base) or sha256_file(base / "model.safetensors")
    if cache.is_file():
        with safe_open(str(cache), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("data_sha256") == data_sha256 and meta.get("reference_sha256") == ref_sha:
            log(f"reference log-probabilities: cached in {cache}")
            return load_file(str(cache))["logps"]
        log(f"{cache} was computed for other data or another reference; recomputing")
    reference = prepare_frozen(load_model(base, device=device), info, parallel)
    logps = dealt_logps(reference, pairs, batch_size, pad_id, device, info)
    del reference  # frozen and no longer needed: training holds only the policy
    if info.is_main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        save_file({"logps": logps.contiguous()}, str(tmp),
                  metadata={"data_sha256": data_sha256, "reference_sha256": ref_sha,
                            "reference": str(base.resolve())})
        tmp.replace(cache)
        log(f"reference log-probabilities of {len(pairs)} pairs cached in {cache}")
    return logps


def _weights_sha(ckpt: Path) -> str | None:
    manifest = ckpt / "manifest.json"
    return read_json(manifest)["files"].get("model.safetensors") if manifest.is_file() else None


def preference_metrics(model, pairs: Sequence[Pair], ref: torch.Tensor, beta: float, batch_size: int, pad_id: int,
                       device, prefix: str = "") -> dict[str, float]:
    """DPO loss, reward accuracy and margin of `model` over `pairs` (no gradients); {} for no pairs."""
    if not pairs:
        return {}
    terms = dpo_terms(pair_logps(model, pairs, batch_size, pad_id, device), ref, beta)
    return {f"{prefix}{k}": float(v) for k, v in terms.items()}


def split_prefs(prefs: Sequence[Preference], val_fraction: float, seed: int):
    return split_chats(prefs, val_fraction, seed)  # the same seeded split, by pair


@dataclass
class PairBatch:
    """Inputs of one DPO micro-batch: the chosen rows then the rejected rows, and the reference's log-probs."""

    x: torch.Tensor
    y: torch.Tensor
    ref: torch.Tensor  # [B, 2]


def dpo_loss(beta: float, pad_id: int) -> Callable[[Any, PairBatch], StepLoss]:
    def loss(model, batch: PairBatch) -> StepLoss:
        lp = sequence_logps(model, batch.x, batch.y)
        n = batch.ref.shape[0]
        terms = dpo_terms(torch.stack([lp[:n], lp[n:]], dim=1), batch.ref, beta)
        count = torch.tensor(float(n), device=batch.x.device)
        return StepLoss(loss=terms["loss"] * count, count=count, tokens=(batch.x != pad_id).sum(),
                        metrics={k: terms[k].detach() * count for k in DPO_METRICS})
    return loss


DPO_METRICS = ("reward_acc", "reward_margin", "chosen_reward", "rejected_reward")


def dpo(base: str | Path, data: Sequence[str | Path], out_dir: str | Path, tc: TrainConfig | None = None, *,
        beta: float = 0.1, val_data: Sequence[str | Path] = (), val_fraction: float = 0.05, epochs: float = 2.0,
        resume: str | None = None, progress: bool = True, explicit: bool = True, allow_change: bool = False,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """Train the policy (initialised from `base`, usually an SFT checkpoint) on preference pairs with DPO."""
    validate_options("dpo", {"beta": beta})
    base, out_dir = Path(base), Path(out_dir)
    tc = copy.deepcopy(tc) if tc is not None else dpo_train_config()  # max_steps/seq_len are filled in below
    model_cfg = load_config(base)
    cfg = complete(RunConfig(model=model_cfg, train=tc, data=DataConfig(corpus=",".join(map(str, data))),
                             preset="dpo"), stage="dpo")
    tok = load_tokenizer(base)

    train_pairs, val_pairs, stats = load_split_encode(
        data, val_data, load=load_preferences, split=split_prefs, encode=encode_pairs, tok=tok,
        seq_len=tc.seq_len, val_fraction=val_fraction, seed=tc.seed, stage="dpo", units=("pairs", "preference pair"),
        log=log)
    flat = lambda pairs: [ex for pair in pairs for ex in pair]  # noqa: E731
    data_sha = examples_sha256(flat(train_pairs), flat(val_pairs))
    info, run, cfg, options = open_post_run(
        "dpo", out_dir, cfg, {"beta": beta, "epochs": epochs, "val_fraction": val_fraction}, resume=resume,
        data_sha256=data_sha, explicit=explicit, allow_change=allow_change, log=log)
    tc, beta, device = cfg.train, options["beta"], info.device

    ref = reference_logps(base, train_pairs + val_pairs, out_dir / CACHE_FILE, data_sha, tc.micro_batch_size,
                          tok.pad_id, device, log, info=info, parallel=tc.parallel)
    ref_train, ref_val = ref[:len(train_pairs)], ref[len(train_pairs):]
    B = tc.micro_batch_size

    def batches_of(epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_pairs), generator=gen).tolist()
        return [order[i:i + B] for i in range(0, len(order), B)]

    def collate(indices: list[int]) -> PairBatch:
        x, y = collate_pairs([train_pairs[i] for i in indices], tok.pad_id)
        return PairBatch(x, y, ref_train[indices])

    if tc.max_steps is None:
        validate_options("dpo", {"epochs": options["epochs"]})
    tc.max_steps = derived_max_steps(run, tc.max_steps, lambda: max(1, math.ceil(
        options["epochs"] * len(batches_of(0)) / batches_per_step(tc, info.world_size))))

    def evaluate(model) -> dict[str, float]:
        if not val_pairs:
            return {}
        terms = dpo_terms(dealt_logps(model, val_pairs, B, tok.pad_id, device, info), ref_val, beta)
        return {f"val_{k}": float(v) for k, v in terms.items()}

    model = load_model(base, device=device) if run.start is None else Transformer.build(cfg.model, device=device)
    stage = Stage("dpo", loss=dpo_loss(beta, tok.pad_id), source=EpochSource(batches_of, collate, info.rank,
                                                                             info.world_size),
                  evaluate=evaluate, metric_names=DPO_METRICS, flops_per_token=model.flops_per_token(tc.seq_len))
    trainer = Trainer(stage, cfg, out_dir, run=run, model=model, tokenizer=tok, info=info, device=device,
                      parent=str(base.resolve()), data_sha256=data_sha,
                      meta={"data": [str(d) for d in data], "beta": beta, "reference": str(base.resolve())},
                      progress=progress, log=log)
    summary = trainer.fit()
    shutdown(info)
    summary["beta"] = beta
    summary["reference_cache"] = str(out_dir / CACHE_FILE)
    summary["data"] = {"train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "kept": stats.kept,
                       "refused": dict(stats.bad)}
    return summary
