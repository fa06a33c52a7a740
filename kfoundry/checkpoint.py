"""The checkpoint directory: everything needed to generate, evaluate, export, serve or resume.

    ckpt/step-000400/
      config.json          model config (kfoundry field names) + format version
      model.safetensors    parameters, names 1:1 with Hugging Face LlamaForCausalLM (tied head stored once)
      tokenizer/           the tokenizer the model was trained with
      trainer_state.json   step, tokens seen, data-loader position, RNG state        (training checkpoints)
      optimizer.pt         optimizer state, loaded with torch.load(weights_only=True) (training checkpoints)
      meta.json            anything else (parent checkpoint, stage, ...)
      manifest.json        sha256 of every file above, written last

The directory is written into a temporary sibling and renamed into place (`fileio.atomic_dir`), so a crash
leaves either the previous state or a complete checkpoint, never a half one. `verify` re-hashes every file
against the manifest; loading never unpickles arbitrary objects (safetensors, weights_only=True).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kfoundry.config import ModelConfig, model_config_from_dict, to_dict
from kfoundry.fileio import atomic_dir, atomic_write_json, read_json, sha256_file
from kfoundry.model.llama import Transformer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Parameters to save: every tensor once (a tied output head is the embedding, so it is left out)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_checkpoint(path: str | Path, model: Transformer, tokenizer=None, *, optimizer=None,
                    trainer_state: dict | None = None, meta: dict | None = None, overwrite: bool = False) -> Path:
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "config.json", {"format_version": FORMAT_VERSION, **to_dict(model.cfg)})
        save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        if trainer_state is not None:
            atomic_write_json(tmp / "trainer_state.json", trainer_state)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if meta is not None:
            atomic_write_json(tmp / "meta.json", meta)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        atomic_write_json(tmp / MANIFEST, {"files": {str(p.relative_to(tmp)): sha256_file(p) for p in files}})
    return path


def verify(path: str | Path) -> None:
    """Raise CheckpointError naming the first file that is missing or whose hash differs from the manifest."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete or not a kfoundry checkpoint)")
    try:
        files = read_json(manifest)["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({e})") from None
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{path}: {name} does not match its recorded sha256 (corrupt checkpoint)")


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"not a checkpoint directory (no config.json): {path}")
    data = read_json(cfg_file)
    data.pop("format_version", None)
    return model_config_from_dict(data)


def load_model(path: str | Path, device: str | torch.device = "cpu", *, check: bool = True) -> Transformer:
    path = Path(path)
    cfg = load_config(path)
    if check and (path / MANIFEST).is_file():
        verify(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()  # sets rotary buffers and re-ties; the weights are overwritten just below
    if not (path / "model.safetensors").is_file() and (path / "dcp" / ".metadata").is_file():
        from kfoundry.train.dist_checkpoint import load_model_weights

        load_model_weights(path, model)  # a sharded (torchrun) checkpoint, consolidated in this process
        return model
    state = load_file(str(path / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match config (missing {sorted(set(missing) - allowed_missing)},"
                              f" unexpected {sorted(unexpected)})")
    return model


def load_tokenizer(path: str | Path):
    from kfoundry.tokenizer import KTokenizer

    tok_dir = Path(path) / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{path} has no tokenizer/ directory")
    return KTokenizer.load(tok_dir)


def load_optimizer_state(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True)


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    return read_json(Path(path) / "trainer_state.json")


def read_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "meta.json"
    return read_json(f) if f.is_file() else {}
