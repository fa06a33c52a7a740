"""A checkpoint directory written by one process: safetensors weights, JSON state, the manifest last.

    step-000400/
      config.json          model config (kfoundry field names) + format version
      model.safetensors    parameters, names 1:1 with Hugging Face LlamaForCausalLM (tied head stored once)
      tokenizer/           the tokenizer the model was trained with
      trainer_state.json   step, tokens seen, data position, RNG state, the run's settings   (training checkpoints)
      optimizer.pt         optimizer state, loaded with torch.load(weights_only=True)          (training checkpoints)
      meta.json            anything else (parent checkpoint, stage, ...)
      manifest.json        sha256 of every file above, written last

Everything that reads weights for inference (generate, serve, eval, export) comes through `load_model`, which
checks the manifest first and reads only safetensors: a checkpoint is never a way to run code.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kfoundry.checkpoint.manifest import verify, write_manifest
from kfoundry.config import ModelConfig, model_config_from_dict, to_dict
from kfoundry.errors import CheckpointError
from kfoundry.fileio import atomic_dir, atomic_write_json
from kfoundry.model.device import pick_device
from kfoundry.model.llama import Transformer
from kfoundry.tokenizer import KTokenizer

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Parameters to save: every tensor once (a tied output head is the embedding, so it is left out)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_weights(directory: Path, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """config.json + model.safetensors of a full (unsharded) state dict."""
    atomic_write_json(directory / "config.json", {"format_version": FORMAT_VERSION, **to_dict(cfg)})
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / WEIGHTS),
              metadata={"format": "pt"})


def save_checkpoint(path: str | Path, model: Transformer, tokenizer=None, *, optimizer=None,
                    trainer_state: dict | None = None, meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write a complete checkpoint directory atomically (a temporary sibling renamed into place)."""
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_weights(tmp, model_state(model), model.cfg)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        if trainer_state is not None:
            atomic_write_json(tmp / "trainer_state.json", trainer_state)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if meta is not None:
            atomic_write_json(tmp / "meta.json", meta)
        write_manifest(tmp)
    return path


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"not a checkpoint directory (no config.json): {path}")
    data = _json_object(path / "config.json")
    data.pop("format_version", None)
    try:
        cfg = model_config_from_dict(data)
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    return cfg


def load_model(path: str | Path, device: str | torch.device = "cpu", *, check: bool = True) -> Transformer:
    """The model of a checkpoint, from its safetensors weights, after the manifest checks (`check=False` only
    for a directory this process has just verified). `device` follows `kfoundry.model.device.pick_device`
    (`auto`, `cpu`, `cuda[:N]`, `mps`; a device this machine lacks means the CPU, with a warning)."""
    path = Path(path)
    device = pick_device(device)
    if check:
        verify(path)
    cfg = load_config(path)
    if not (path / WEIGHTS).is_file():
        if (path / "dcp").is_dir():
            raise CheckpointError(f"{path} holds only the shards of a distributed run (dcp/), which are read only to "
                                  "resume that run; use the run's final checkpoint (it is consolidated into "
                                  f"{WEIGHTS}), or resume the run to its end")
        raise CheckpointError(f"{path}: no {WEIGHTS}")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()  # sets rotary buffers and re-ties; the weights are overwritten just below
    try:
        state = load_file(str(path / WEIGHTS), device=str(device))
    except SafetensorError as e:
        raise CheckpointError(f"{path / WEIGHTS}: unreadable ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match config (missing {sorted(set(missing) - allowed_missing)},"
                              f" unexpected {sorted(unexpected)})")
    return model


def load_tokenizer(path: str | Path):
    tok_dir = Path(path) / "tokenizer"
    if not tok_dir.is_dir():
        raise CheckpointError(f"{path} has no tokenizer/ directory")
    return KTokenizer.load(tok_dir)


def load_optimizer_state(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """optimizer.pt through torch's safe loader (tensors and plain containers only). `mmap=True` maps the tensors
    instead of reading them: a cheap check that the file is one the safe loader accepts."""
    f = Path(path) / "optimizer.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no optimizer.pt") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{f}: refused by the safe loader ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise CheckpointError(f"{f}: not an optimizer state dict")
    return state


TRAINER_STATE_KEYS = {"step": int, "tokens_seen": int, "rng": dict}


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    state = _json_object(Path(path) / "trainer_state.json")
    for key, tp in TRAINER_STATE_KEYS.items():
        if not isinstance(state.get(key), tp) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{Path(path) / 'trainer_state.json'}: missing or malformed {key!r}")
    if state["step"] < 0:
        raise CheckpointError(f"{Path(path) / 'trainer_state.json'}: negative step")
    return state


def read_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "meta.json"
    return _json_object(f) if f.is_file() else {}
