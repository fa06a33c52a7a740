"""`kfoundry upscale`: read a checkpoint, grow it by depth up-scaling (SOLAR), write the child checkpoint and
record it in the ledger. The state-dict transform itself is pure and lives in kfoundry/model/upscale.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kfoundry import checkpoint as ckpt_io
from kfoundry.errors import CheckpointError, ConfigError
from kfoundry.fileio import sha256_file
from kfoundry.model.llama import Transformer
from kfoundry.model.upscale import (EXTERNAL_FIELDS, dus_plan, format_plan, parse_layer_plan, upscale_config,
                                    upscale_state_dict)
from kfoundry.provenance import record_checkpoint


def upscale_checkpoint(model_dir: str | Path, out: str | Path, *, drop: int | None = None,
                       layers: str | None = None, overwrite: bool = False) -> Path:
    """Read checkpoint `model_dir`, write the up-scaled checkpoint to `out`; give exactly one of drop / layers.

    The new `meta.json` records the parent (its path and manifest hash) and the plan. No optimizer or trainer
    state is written: continued pretraining starts a fresh optimizer and a fresh schedule.
    """
    if (drop is None) == (layers is None):
        raise ConfigError("give exactly one of --drop M or --layers PLAN")
    model_dir = Path(model_dir)
    if Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    parent_cfg = ckpt_io.load_config(model_dir)  # FileNotFoundError with a clear message if it is not one
    n = parent_cfg.n_layers
    plan = dus_plan(n, drop) if drop is not None else parse_layer_plan(layers, n)
    child_cfg = upscale_config(parent_cfg, plan)

    parent = ckpt_io.load_model(model_dir)  # verifies the manifest's hashes first
    tok = ckpt_io.load_tokenizer(model_dir) if (model_dir / "tokenizer").is_dir() else None
    state = upscale_state_dict(ckpt_io.model_state(parent), plan)
    del parent

    with torch.device("meta"):
        child = Transformer(child_cfg)
    child.to_empty(device="cpu")
    child.init_weights()  # rotary buffer and the tie; every weight is overwritten just below
    missing, unexpected = child.load_state_dict(state, strict=False)
    if set(missing) - ({"lm_head.weight"} if child_cfg.tie_embeddings else set()) or unexpected:
        raise CheckpointError(f"up-scaled weights do not fit the child config (missing {missing}, "
                              f"unexpected {unexpected})")

    parent_meta = ckpt_io.read_meta(model_dir)
    manifest = model_dir / ckpt_io.MANIFEST
    meta: dict[str, Any] = {
        "stage": "upscale",
        "parent": str(model_dir.resolve()),
        "parent_manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
        "upscale": {
            "method": "depth-up-scaling (SOLAR, arXiv:2312.15166)",
            "parent_layers": n,
            "layers": len(plan),
            "drop": drop,
            "plan": plan,
            "plan_text": format_plan(plan),
        },
    }
    meta.update({k: parent_meta[k] for k in EXTERNAL_FIELDS if k in parent_meta})
    path = ckpt_io.save_checkpoint(out, child, tok, meta=meta, overwrite=overwrite)
    record_checkpoint(path)  # provenance ledger: a derivation from the parent's recorded entry
    return path
