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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kfoundry.config import TrainConfig
from kfoundry.fileio import read_json
from kfoundry.post.chat_format import normalize_messages, render_many, render_text
from kfoundry.post.data import LoadStats, Preference, load_preferences, load_split_encode
from kfoundry.post.runner import PostTrainer
from kfoundry.post.sft import Example, examples_sha256, post_train_config
from kfoundry.train import loop

DPO_DEFAULTS: dict[str, Any] = {"lr": 2e-4, "min_lr_ratio": 0.1, "warmup_steps": 5, "weight_decay": 0.0,
                                "max_steps": 0, "eval_every": 25, "ckpt_every": 100, "log_every": 5}
CACHE_FILE = "reference_logps.safetensors"

Pair = tuple[Example, Example]  # (chosen, rejected)


def dpo_train_config(preset_name: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    return post_train_config(preset_name, overrides, DPO_DEFAULTS)


def encode_reply(tok, prompt: Sequence[dict], reply: str) -> Example:
    """The conversation prompt + reply, with the mask on the reply's tokens only (not earlier assistant turns)."""
    (ids, mask), = render_many(tok, [[*prompt, {"role": "assistant", "content": reply}]])
    return _reply_example(ids, mask, tok.encode(render_text(tok, normalize_messages(prompt), True)))


def _reply_example(ids: list[int], mask: list[bool], prompt: list[int]) -> Example:
    if ids[:len(prompt)] != prompt:
        raise ValueError("the prompt does not tokenize to a prefix of prompt + reply")
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
        with loop.autocast(device):
            lp = sequence_logps(model, x.to(device), y.to(device)).float().cpu()
        out.append(torch.stack([lp[:len(chunk)], lp[len(chunk):]], dim=1))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def reference_logps(base: Path, pairs: Sequence[Pair], cache: Path, data_sha256: str, batch_size: int, pad_id: int,
                    device, log: Callable[[str], None]) -> torch.Tensor:
    """The frozen reference's [N, 2] log-probabilities: from the cache when it matches, else computed and cached."""
    from kfoundry.checkpoint import load_model
    from kfoundry.fileio import sha256_file

    ref_sha = _weights_sha(base) or sha256_file(base / "model.safetensors")
    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("data_sha256") == data_sha256 and meta.get("reference_sha256") == ref_sha:
            log(f"reference log-probabilities: cached in {cache}")
            return load_file(str(cache))["logps"]
        log(f"{cache} was computed for other data or another reference; recomputing")
    reference = load_model(base, device=device)
    for p in reference.parameters():
        p.requires_grad_(False)
    logps = pair_logps(reference, pairs, batch_size, pad_id, device)
    del reference  # frozen and no longer needed: training holds only the policy
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    save_file({"logps": logps.contiguous()}, str(tmp),
              metadata={"data_sha256": data_sha256, "reference_sha256": ref_sha, "reference": str(base.resolve())})
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
    from kfoundry.post.sft import split_chats

    return split_chats(prefs, val_fraction, seed)  # the same seeded split, by pair


def dpo(base: str | Path, data: Sequence[str | Path], out_dir: str | Path, tc: TrainConfig | None = None, *,
        beta: float = 0.1, val_data: Sequence[str | Path] = (), val_fraction: float = 0.05, epochs: float = 2.0,
        resume: str | None = None, progress: bool = True,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """Train the policy (initialised from `base`, usually an SFT checkpoint) on preference pairs with DPO."""
    from kfoundry.checkpoint import load_config, load_tokenizer

    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    base, out_dir = Path(base), Path(out_dir)
    tc = copy.deepcopy(tc) if tc is not None else dpo_train_config()  # max_steps/seq_len are filled in below
    model_cfg = load_config(base)
    tc.seq_len = min(tc.seq_len, model_cfg.max_seq_len)
    tok = load_tokenizer(base)

    train_pairs, val_pairs, stats = load_split_encode(
        data, val_data, load=load_preferences, split=split_prefs, encode=encode_pairs, tok=tok,
        seq_len=tc.seq_len, val_fraction=val_fraction, seed=tc.seed, stage="dpo", units=("pairs", "preference pair"),
        log=log)
    flat = lambda pairs: [ex for pair in pairs for ex in pair]  # noqa: E731
    data_sha = examples_sha256(flat(train_pairs), flat(val_pairs))

    device = loop.pick_device(tc.device)
    ref = reference_logps(base, train_pairs + val_pairs, out_dir / CACHE_FILE, data_sha, tc.micro_batch_size,
                          tok.pad_id, device, log)
    ref_train, ref_val = ref[:len(train_pairs)], ref[len(train_pairs):]

    B = tc.micro_batch_size

    def batches_of(epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_pairs), generator=gen).tolist()
        return [order[i:i + B] for i in range(0, len(order), B)]

    if tc.max_steps <= 0:
        if epochs <= 0:
            raise ValueError("epochs must be positive (or set train.max_steps)")
        tc.max_steps = max(1, math.ceil(epochs * len(batches_of(0))))

    trainer = PostTrainer("dpo", base, out_dir, tc, resume=resume, data_sha256=data_sha,
                          data_spec=",".join(map(str, data)), progress=progress, log=log,
                          meta={"data": [str(d) for d in data], "beta": beta, "reference": str(base.resolve())})
    model = trainer.model

    def train_step(indices: list[int]) -> dict[str, float]:
        pairs = [train_pairs[i] for i in indices]
        x, y = collate_pairs(pairs, tok.pad_id)
        with loop.autocast(device):
            lp = sequence_logps(model, x.to(device), y.to(device))
        policy = torch.stack([lp[:len(pairs)], lp[len(pairs):]], dim=1)
        terms = dpo_terms(policy, ref_train[indices].to(device), beta)
        terms["loss"].backward()
        return {**{k: float(v.detach()) for k, v in terms.items()}, "tokens": int((x != tok.pad_id).sum())}

    def evaluate() -> dict[str, float]:
        return preference_metrics(model, val_pairs, ref_val.to(device), beta, B, tok.pad_id, device, prefix="val_")

    summary = trainer.fit(batches_of, train_step, evaluate)
    summary["beta"] = beta
    summary["reference_cache"] = str(out_dir / CACHE_FILE)
    summary["data"] = {"train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "kept": stats.kept,
                       "refused": dict(stats.bad)}
    return summary
