"""Model merging: average the weights of models fine-tuned from one parent into a model with both strengths.

Two methods, applied tensor by tensor:

- **linear** (weight averaging, "model soups", Wortsman et al. 2022): theta = sum_i w_i * theta_i with the weights
  normalised to sum to 1, for any number of models. SOLAR-10.7B-Instruct's last step was this kind of average of
  models trained with different data mixes.
- **slerp** (spherical linear interpolation, two models): each tensor moves along the great circle between the two
  parents instead of the straight chord between them,

      omega = angle between a and b (as flattened vectors)
      slerp(a, b; t) = sin((1 - t) * omega) / sin(omega) * a + sin(t * omega) / sin(omega) * b

  which keeps the interpolated tensor's norm from shrinking the way a plain average of two diverging tensors does.
  When a and b are (almost) parallel, sin(omega) ~ 0 and the formula is unstable, so linear interpolation is used
  (it is the same thing in that limit). t = 0 gives a, t = 1 gives b; computed in float64 and cast back.

Merging is only meaningful between models of one architecture that read the same tokens: the configs must be
identical and the tokenizers too (same tokenizer.json hash and chat template); otherwise it is a clear error.
The merged checkpoint records its parents (path and weight hash), the method and the weights in meta.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kfoundry import checkpoint as ckpt_io
from kfoundry.config import to_dict
from kfoundry.errors import CheckpointError, ConfigError
from kfoundry.fileio import read_json, sha256_file
from kfoundry.provenance import record_checkpoint

METHODS = ("linear", "slerp")
PARALLEL_DOT = 0.9995  # |cos(omega)| above this: treat as parallel and interpolate linearly


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return ((1 - t) * a.double() + t * b.double()).to(a.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tensors of one shape (see the module docstring)."""
    if not 0 <= t <= 1:
        raise ConfigError(f"slerp needs t in [0, 1], got {t}")
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = a64.norm(), b64.norm()
    if na == 0 or nb == 0:
        return lerp(a, b, t)
    dot = float(torch.dot(a64 / na, b64 / nb).clamp(-1, 1))
    if abs(dot) > PARALLEL_DOT:
        return lerp(a, b, t)
    omega = math.acos(dot)
    s = math.sin(omega)
    out = (math.sin((1 - t) * omega) / s) * a64 + (math.sin(t * omega) / s) * b64
    return out.view(a.shape).to(a.dtype)


def check_compatible(paths: Sequence[Path]) -> None:
    """Raise ValueError unless every checkpoint has the first one's config and tokenizer."""
    first = paths[0]
    cfg0 = to_dict(ckpt_io.load_config(first))
    tok0 = ckpt_io.load_tokenizer(first)
    for p in paths[1:]:
        cfg = to_dict(ckpt_io.load_config(p))
        diff = {k: (cfg0[k], cfg.get(k)) for k in cfg0 if cfg0[k] != cfg.get(k)}
        if diff:
            shown = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in sorted(diff.items()))
            raise CheckpointError(f"cannot merge {first} and {p}: the architectures differ ({shown})")
        tok = ckpt_io.load_tokenizer(p)
        if tok.hash != tok0.hash:
            raise CheckpointError(f"cannot merge {first} and {p}: their tokenizers differ "
                                  f"(tokenizer.json sha256 {tok0.hash[:12]} vs {tok.hash[:12]})")
        if tok.chat_template != tok0.chat_template:
            raise CheckpointError(f"cannot merge {first} and {p}: their chat templates differ")


def normalized_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(f"{len(weights)} weights for {n} models; give one weight per model")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite and non-negative, got {list(weights)}")
    total = sum(weights)
    if total <= 0:
        raise ConfigError("the weights sum to zero")
    return [w / total for w in weights]


def merge_states(states: Sequence[dict[str, torch.Tensor]], method: str, weights: Sequence[float]
                 ) -> dict[str, torch.Tensor]:
    """Merge state dicts with identical keys and shapes. `weights` are normalised (slerp: t = weights[1])."""
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose {' or '.join(METHODS)}")
    if method == "slerp" and len(states) != 2:
        raise ConfigError(f"slerp merges exactly two models, got {len(states)}")
    out = {}
    for name, first in states[0].items():
        tensors = [s[name] for s in states]
        if method == "slerp":
            out[name] = slerp(tensors[0], tensors[1], weights[1])
        else:
            acc = torch.zeros_like(first, dtype=torch.float64)
            for w, t in zip(weights, tensors):
                acc += w * t.double()
            out[name] = acc.to(first.dtype)
    return out


def merge(models: Sequence[str | Path], out: str | Path, *, method: str = "linear",
          weights: Sequence[float] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Merge checkpoints into a new checkpoint at `out`; returns what meta.json records.

    slerp: `weights` may be one number t (the share of the second model) or two weights (t = w2 / (w1 + w2)).
    """
    paths = [Path(m) for m in models]
    if len(paths) < 2:
        raise ConfigError("merging needs at least two models")
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose {' or '.join(METHODS)}")
    if method == "slerp":
        if len(paths) != 2:
            raise ConfigError(f"slerp merges exactly two models, got {len(paths)}")
        if weights is not None and len(weights) == 1:
            if not 0 <= weights[0] <= 1:
                raise ConfigError(f"slerp t must be in [0, 1], got {weights[0]}")
            weights = [1 - weights[0], weights[0]]
    norm = normalized_weights(len(paths), weights)
    for p in paths:
        ckpt_io.verify(p) if (p / ckpt_io.MANIFEST).is_file() else ckpt_io.load_config(p)
    check_compatible(paths)

    model = ckpt_io.load_model(paths[0])
    states = [ckpt_io.model_state(model)] + [ckpt_io.model_state(ckpt_io.load_model(p)) for p in paths[1:]]
    merged = merge_states(states, method, norm)
    model.load_state_dict(merged, strict=False)  # a tied head is the embedding, already set through it
    parents = [{"path": str(p.resolve()), "model_sha256": _model_sha(p), "weight": w} for p, w in zip(paths, norm)]
    meta = {"stage": "merge", "method": method, "parents": parents, "parent": parents[0]["path"],
            "weights": norm, **({"t": norm[1]} if method == "slerp" else {})}
    ckpt_io.save_checkpoint(out, model, ckpt_io.load_tokenizer(paths[0]), meta=meta, overwrite=overwrite)
    record_checkpoint(out)  # provenance ledger: a derivation naming every parent's recorded entry
    return meta


def _model_sha(path: Path) -> str:
    manifest = path / ckpt_io.MANIFEST
    if manifest.is_file():
        return read_json(manifest)["files"]["model.safetensors"]
    return sha256_file(path / "model.safetensors")
