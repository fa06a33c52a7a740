"""Typed configuration: dataclasses, named presets, YAML recipes and dotted overrides.

A run is described by one `RunConfig` (model + train + data). It is built in three layers, each overriding
the one before, so that what ran can always be written out and diffed:

    preset (Python defaults, by name)  ->  recipe (YAML file)  ->  --set key=value overrides

Every command writes the resolved config into its output directory (`write_config`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder. Field names follow the paper/torchtitan; `to_hf` maps them to HF."""

    vocab_size: int = 4096
    dim: int = 256  # hidden size (HF: hidden_size)
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # < n_heads means grouped-query attention
    ffn_dim: int = 768  # SwiGLU inner size (HF: intermediate_size)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False  # RMSNorm on q and k per head (OLMo-2/Qwen-3 style); not representable in HF Llama
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")


@dataclass
class TrainConfig:
    """How to optimise. Token budgets are explicit so runs on different hardware stay comparable."""

    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per forward pass on one process
    tokens_per_step: int = 0  # 0 = one micro-batch per step; else gradient accumulation up to this many tokens
    max_steps: int = 300
    optimizer: str = "adamw"  # adamw | muon (Muon on the blocks' 2-D matrices, AdamW on embeddings, head, norms)
    lr: float = 3e-3  # AdamW's peak learning rate; the schedule's reference (other groups scale with it)
    muon_lr: float = 0.02  # optimizer=muon: Muon's peak learning rate on the hidden matrices
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # optimizer=muon: decoupled decay of the hidden matrices (x lr per step)
    embed_lr: float = 0.0  # AdamW peak learning rate of the token embedding; 0 = lr
    head_lr: float = 0.0  # ... of an untied output head; 0 = lr
    norm_lr: float = 0.0  # ... of the RMSNorm gains; 0 = lr
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    decay_frac: float = 0.2  # WSD: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    z_loss: float = 0.0  # > 0: coefficient of the z-loss, logsumexp(logits)^2 per target (pretraining); 1e-4 typical
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model (per transformer block under torchrun)
    parallel: str = "fsdp"  # under torchrun: fsdp (FSDP2, sharded) | ddp (replicated)
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% more compute
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    max_minutes: float = 0.0  # 0 = no wall-clock limit; else stop (and checkpoint) when reached
    wandb: bool = False
    prefetch: int = 2  # batches drawn ahead on a background thread (pinned memory on CUDA); 0 = draw in the step
    async_checkpoint: bool = True  # under torchrun: write DCP shards in the background (final checkpoints wait)
    dist_timeout_minutes: float = 10.0  # how long a collective may wait before the job is aborted (NCCL watchdog)


@dataclass
class DataConfig:
    """Where tokens come from."""

    corpus: str = "starter"
    vocab_size: int = 4096
    val_fraction: float = 0.05
    max_chars_per_doc: int = 100_000
    max_total_chars: int = 200_000_000
    split_chars: int = 0  # > 0: split longer documents at paragraph boundaries before sharding (corpus/chunk.py)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = "cpu-tiny"


# ---------------------------------------------------------------------------------------------------------
# Presets. Keep them few and meaningful; recipes/ holds the YAML versions users copy and edit.

PRESETS: dict[str, dict[str, Any]] = {
    # Trains in a few minutes on 2 CPU cores: ~3M parameters, 4k vocabulary.
    "cpu-tiny": {
        "model": dict(vocab_size=4096, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512, max_seq_len=256,
                      tie_embeddings=True),
        "train": dict(seq_len=256, micro_batch_size=8, max_steps=400, optimizer="muon", lr=3e-3, muon_lr=0.01,
                      embed_lr=1e-2, warmup_steps=20, schedule="wsd", decay_frac=0.3, min_lr_ratio=0.0, eval_every=100,
                      ckpt_every=100),
        "data": dict(vocab_size=4096, split_chars=1200),
    },
    # A model small enough for unit tests: seconds on CPU.
    "test-micro": {
        "model": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                      tie_embeddings=True),
        "train": dict(seq_len=64, micro_batch_size=4, max_steps=20, lr=3e-3, warmup_steps=4, eval_every=10,
                      eval_batches=2, ckpt_every=10, log_every=5),
        "data": dict(vocab_size=512, split_chars=600),
    },
    # An edge model for llama.cpp on phones and boards (~1.3M parameters with a 4k vocabulary), and the default
    # student of `kfoundry distill`. Every row length (dim, ffn_dim) is a multiple of 32, so it exports as Q8_0/Q4_0.
    "nano": {
        "model": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=256,
                      tie_embeddings=True),
        "train": dict(seq_len=256, micro_batch_size=8, max_steps=400, lr=3e-3, warmup_steps=40, eval_every=100,
                      ckpt_every=100),
        "data": dict(vocab_size=4096),
    },
    # GPT-2 small shape (124M with a 50k vocabulary; 32k Korean-efficient vocabulary here), for one GPU.
    "gpu-124m": {
        "model": dict(vocab_size=32768, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                      max_seq_len=1024, tie_embeddings=True),
        "train": dict(seq_len=1024, micro_batch_size=32, tokens_per_step=524_288, max_steps=5000, optimizer="muon",
                      lr=1e-3, muon_lr=0.02, warmup_steps=200, schedule="wsd", decay_frac=0.3, min_lr_ratio=0.0,
                      eval_every=250, eval_batches=20, ckpt_every=500, compile=True),
        "data": dict(vocab_size=32768),
    },
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    cfg = from_dict(RunConfig(), PRESETS[name])
    cfg.preset = name
    return cfg


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass, with type checking so a typo in a recipe is an error, not a silent default.


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        f = float(value)
        if f != int(f):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def from_dict(obj: Any, data: dict[str, Any], prefix: str = "") -> Any:
    """Update dataclass `obj` in place from a nested dict; unknown keys raise with their dotted name."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown config key {dotted!r}; known: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{dotted}: expected a mapping")
            from_dict(current, value, prefix=dotted + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> dict[str, Any]:
    """`train.lr=1e-3` -> {"train": {"lr": 0.001}}. Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_recipe(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe not found: {p}")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {p} must be a YAML mapping")
    return data


def resolve(preset_name: str | None = None, recipe: str | Path | None = None,
            overrides: list[str] | None = None) -> RunConfig:
    """Preset, then recipe (which may name its own `preset:`), then overrides."""
    recipe_data = load_recipe(recipe) if recipe else {}
    name = preset_name or recipe_data.pop("preset", None) or "cpu-tiny"
    recipe_data.pop("preset", None)
    cfg = preset(name)
    from_dict(cfg, recipe_data)
    for o in overrides or []:
        from_dict(cfg, parse_override(o))
    cfg.model.validate()
    if cfg.model.vocab_size < cfg.data.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < data.vocab_size={cfg.data.vocab_size}")
    return cfg


def write_config(cfg: Any, out_dir: str | Path, name: str = "run_config.json") -> Path:
    """Record the resolved config next to what it produced."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig(), d)
