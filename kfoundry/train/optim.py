"""Optimizers (AdamW, or Muon on the hidden matrices with AdamW elsewhere) and the learning-rate schedules.

`train.optimizer` picks one:

- `adamw`: AdamW on every parameter. Decoupled weight decay (Loshchilov & Hutter 2019: applied to the weights
  directly, not through the gradient, so Adam's second moment does not rescale it) on matrices only; on gains
  (RMSNorm weights, initialised at 1) it would fight the normalisation, as in nanoGPT and torchtitan.
- `muon`: PyTorch's own `torch.optim.Muon` (Jordan et al. 2024) on the 2-D matrices inside the transformer
  blocks (attention and MLP projections), AdamW on the rest: the token embedding, the output head and the norms,
  each with its own learning rate. Muon replaces the update of a weight matrix by the nearest semi-orthogonal
  matrix to its momentum (a few Newton-Schulz iterations), so every direction of the matrix moves by the same
  amount; embeddings and the head are looked up / read row by row, where that reasoning does not hold, and norm
  gains are vectors, so they stay with AdamW (Keller Jordan's and Moonshot's recipes do the same).

Learning rates and the schedule. Each parameter group carries `lr_scale`: its peak learning rate divided by
`train.lr`. The schedule (`lr_at`) gives the learning rate for `train.lr`; the training loop sets every group to

    group["lr"] = lr_at(step, cfg) * group["lr_scale"]

so one warmup/decay shape drives groups whose peak rates differ by an order of magnitude (Muon's ~0.02, AdamW's
~0.003). `apply_lr` does exactly that.

Distributed. Under FSDP2 every parameter (and its gradient and momentum) is a DTensor holding one slice of rows.
Newton-Schulz is a function of the whole matrix, not of its rows, so `ShardedMuon` all-gathers each blended
update, orthogonalises the whole matrix on every rank and keeps its own rows (one all-gather per matrix per step,
the same volume FSDP already moves for the forward pass). The momentum stays sharded, so optimizer memory stays
1/world per rank, and DCP saves it like any other sharded state. Without DTensors it is `torch.optim.Muon`'s own
step, unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from kfoundry.config import TrainConfig
from kfoundry.errors import ConfigError

OPTIMIZERS = ("adamw", "muon")


# ---------------------------------------------------------------------------------------------------------
# Muon that also works on FSDP2's sharded parameters


class ShardedMuon(torch.optim.Muon):
    """`torch.optim.Muon`, plus a step for FSDP2 DTensor parameters that orthogonalises whole matrices."""

    @torch.no_grad()
    def step(self, closure=None):
        if not any(_is_dtensor(p) for g in self.param_groups for p in g["params"]):
            return super().step(closure)  # plain tensors: PyTorch's step as it ships
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                # The same arithmetic as torch.optim._muon._single_tensor_muon, row-sharded where it can be.
                buf.lerp_(p.grad, 1 - mu)  # elementwise: each rank updates its own rows
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                ortho = _zeropower_via_newtonschulz(update.full_tensor(), group["ns_coefficients"],
                                                    group["ns_steps"], group["eps"])
                # src_data_rank=None: every rank already holds the whole result; each keeps its rows, no traffic.
                ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))  # p.shape: the global shape
        return loss


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer object over two: `ShardedMuon` for hidden matrices and `torch.optim.AdamW` for the rest.

    It is a real `torch.optim.Optimizer` whose `param_groups` are the two inner optimizers' groups (Muon's first)
    and whose `state` both share, so the training loop, `state_dict()`/`load_state_dict()` (optimizer.pt) and
    DCP's `get_state_dict`/`set_state_dict` see one ordinary optimizer.
    """

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], *,
                 muon_kwargs: dict[str, Any], adamw_kwargs: dict[str, Any]):
        self.muon = ShardedMuon(muon_groups, **muon_kwargs)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw_kwargs)
        self._n_muon = len(self.muon.param_groups)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this object's groups and state (load_state_dict replaces both)."""
        self.muon.param_groups = self.param_groups[: self._n_muon]
        self.adamw.param_groups = self.param_groups[self._n_muon:]
        self.muon.state = self.state
        self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()


# ---------------------------------------------------------------------------------------------------------
# Building


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by role: `hidden` (2-D matrices inside the blocks), `embed`, `head` (an untied output
    head; a tied one is the embedding and appears once, there) and `norm` (1-D gains).

    Roles come from the Hugging Face-style names of `kfoundry.model.llama` (FSDP2 and activation-checkpoint
    wrappers keep them, with a wrapper prefix that does not matter here)."""
    roles: dict[str, list[nn.Parameter]] = {"hidden": [], "embed": [], "head": [], "norm": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # named_parameters() yields a tied matrix once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if "embed_tokens" in name:
            roles["embed"].append(p)
        elif "lm_head" in name:
            roles["head"].append(p)
        elif p.ndim < 2:
            roles["norm"].append(p)
        elif ".layers." in f".{name}" and p.ndim == 2:
            roles["hidden"].append(p)
        else:
            raise ValueError(f"parameter {name} (shape {tuple(p.shape)}) has no optimizer role")
    return roles


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, with one group per role, each with `lr_scale` (see the module doc).

    The initial `lr` of each group is its peak rate; the loop overwrites it every step through `apply_lr`."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown train.optimizer={cfg.optimizer!r} (use {' or '.join(OPTIMIZERS)})")
    roles = split_parameters(model)
    base = cfg.lr
    peak = {"embed": cfg.embed_lr or base, "head": cfg.head_lr or base, "norm": cfg.norm_lr or base,
            "hidden": cfg.muon_lr if cfg.optimizer == "muon" else base}
    decay = {"embed": cfg.weight_decay, "head": cfg.weight_decay, "norm": 0.0, "hidden": cfg.weight_decay}

    def group(role: str, **extra) -> dict[str, Any]:
        return {"params": roles[role], "name": role, "lr": peak[role], "lr_scale": peak[role] / base,
                "weight_decay": decay[role], **extra}

    adam_roles = ["embed", "head", "norm"] + (["hidden"] if cfg.optimizer == "adamw" else [])
    adamw_groups = [group(r) for r in adam_roles if roles[r]]
    # The fused kernel updates each parameter in one pass over its memory (one launch on CUDA); the default
    # "foreach" path makes a pass per elementwise operation (~8), which on a CPU costs as much as a tenth of a
    # training step (bench/train_throughput.py). Both are deterministic.
    adamw_kwargs = dict(lr=base, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=device_type in ("cuda", "cpu"))
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(adamw_groups, **adamw_kwargs)
    muon_groups = [group("hidden", weight_decay=cfg.muon_weight_decay)] if roles["hidden"] else []
    muon_kwargs = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn="original",
                       ns_steps=cfg.muon_ns_steps)
    return MuonAdamW(muon_groups, adamw_groups, muon_kwargs=muon_kwargs, adamw_kwargs=adamw_kwargs)


def apply_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set every group's learning rate for optimizer step `step`; returns the base rate (for `train.lr`)."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def optimizer_flops_per_step(model: nn.Module, cfg: TrainConfig) -> float:
    """Extra FLOPs one optimizer step costs beyond elementwise updates: Muon's Newton-Schulz iterations.

    For an m x n matrix (m <= n) each iteration computes X Xᵀ (2m²n), (X Xᵀ)² (2m³) and that times X (2m²n).
    At small batches this is a real share of a step (the time-to-quality benchmark counts it); AdamW's
    elementwise work is a few FLOPs per parameter and is left out, as MFU conventions do."""
    if cfg.optimizer != "muon":
        return 0.0
    total = 0.0
    for p in split_parameters(model)["hidden"]:
        m, n = sorted(p.shape[:2])
        total += cfg.muon_ns_steps * (4 * m * m * n + 2 * m ** 3)
    return float(total)


# ---------------------------------------------------------------------------------------------------------
# Schedules


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for `train.lr` at optimizer step `step` (0-based); groups scale it by their `lr_scale`.

    cosine: linear warmup to lr, then cosine down to lr * min_lr_ratio at max_steps.
    wsd:    linear warmup, a long stable phase at lr, then a linear decay to lr * min_lr_ratio over the last
            `decay_frac` of the steps (Hu et al. 2024, MiniCPM). The stable phase can be extended or branched
            from at any point, which is what continued pretraining (and bench/time_to_quality.py) wants.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(round(cfg.decay_frac * cfg.max_steps)))
        decay_start = cfg.max_steps - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / decay_steps)
        return peak + (floor - peak) * progress
    raise ConfigError(f"unknown schedule {cfg.schedule!r} (use cosine or wsd)")
