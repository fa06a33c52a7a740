"""Typed configuration: dataclasses, named presets, YAML recipes, dotted overrides and the one `validate()`.

A run is described by one `RunConfig` (model + train + data). It is built in three layers, each overriding
the one before, so that what ran can always be written out and diffed:

    preset (Python defaults, by name)  ->  recipe (YAML file)  ->  --set key=value overrides  ->  validate()

Rules of the house:

- Each setting's meaning lives once, in its field's `help` metadata; `kfoundry config` and the `--help` of the
  training commands print it from there (`settings_table`).
- Every constraint between settings lives once, in `validate()`, and every stage calls it (pretraining,
  SFT, DPO, distillation): a setting that is wrong is refused in one line that names its key, never clamped.
- `None` (YAML `null`) means "off" / "not set": no wall-clock limit, no gradient accumulation, the model's own
  context length. Older files used 0 for some of these; such a 0 is still read as `None` (`legacy_off`), so old
  recipes and the settings recorded in old checkpoints keep loading.
- Post-training stages have presets too (`STAGE_PRESETS`): SFT, DPO and distillation layer their settings on a
  pretraining preset, the same way a recipe layers on one.

Every command writes the resolved config into its output directory (`write_config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kfoundry.errors import ConfigError, MissingPathError


def _s(default: Any, help: str, *, legacy_off: Any = None) -> Any:
    """A setting: its default and its one-line meaning (`help`). `legacy_off` is the value older files used
    for "off" (now `None`); it is read as `None`."""
    meta: dict[str, Any] = {"help": help}
    if legacy_off is not None:
        meta["legacy_off"] = legacy_off
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder. Field names follow the paper/torchtitan; `to_hf` maps them to HF."""

    vocab_size: int = _s(4096, "rows of the embedding table (>= the tokenizer's vocabulary)")
    dim: int = _s(256, "hidden size (HF: hidden_size); a multiple of n_heads")
    n_layers: int = _s(4, "transformer blocks")
    n_heads: int = _s(4, "attention (query) heads; dim / n_heads is the head size, which must be even (RoPE)")
    n_kv_heads: int = _s(4, "key/value heads; fewer than n_heads (dividing it) is grouped-query attention")
    ffn_dim: int = _s(768, "SwiGLU inner size (HF: intermediate_size)")
    max_seq_len: int = _s(256, "the longest context the model is built for (RoPE tables, KV cache)")
    rope_theta: float = _s(10000.0, "RoPE base frequency")
    norm_eps: float = _s(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = _s(False, "share the input embedding with the output head")
    qk_norm: bool = _s(False, "RMSNorm on q and k per head (OLMo-2/Qwen-3 style); not representable in HF Llama")
    init_std: float = _s(0.02, "standard deviation of the random initialisation")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """The model's own rules (`validate` checks these with the rest of a run's settings)."""
        _raise_first(_model_problems(self, "model."))


@dataclass
class TrainConfig:
    """How to optimise. Token budgets are explicit so runs on different hardware stay comparable."""

    seq_len: int | None = _s(256, "tokens per training row; null = the model's max_seq_len (never more than it)")
    micro_batch_size: int = _s(8, "sequences per forward pass on one process")
    tokens_per_step: int | None = _s(None, "tokens per optimizer step over all processes, reached by gradient "
                                           "accumulation; null = one micro-batch per step", legacy_off=0)
    max_steps: int | None = _s(300, "optimizer steps; null = derived from --epochs (SFT, DPO); pretraining and "
                                    "distillation need a number")
    optimizer: str = _s("adamw", "adamw | muon (Muon on the blocks' 2-D matrices, AdamW on embeddings, head, norms)")
    lr: float = _s(3e-3, "AdamW's peak learning rate; the schedule's reference (other groups scale with it)")
    muon_lr: float = _s(0.02, "optimizer=muon: Muon's peak learning rate on the hidden matrices")
    muon_momentum: float = _s(0.95, "optimizer=muon: Muon's momentum, in [0, 1)")
    muon_weight_decay: float = _s(0.0, "optimizer=muon: decoupled decay of the hidden matrices (x lr per step)")
    muon_ns_steps: int = _s(5, "optimizer=muon: Newton-Schulz iterations per step; each costs 4m²n+2m³ FLOPs per "
                               "m×n matrix (m <= n), a real share of a step at small batches")
    embed_lr: float | None = _s(None, "peak learning rate of the token embedding; null = lr", legacy_off=0.0)
    head_lr: float | None = _s(None, "peak learning rate of an untied output head; null = lr", legacy_off=0.0)
    norm_lr: float | None = _s(None, "peak learning rate of the RMSNorm gains; null = lr", legacy_off=0.0)
    min_lr_ratio: float = _s(0.1, "final learning rate as a fraction of the peak, in [0, 1]")
    warmup_steps: int = _s(30, "steps of linear warmup from 0 to the peak learning rate")
    schedule: str = _s("cosine", "cosine | wsd (warmup-stable-decay)")
    decay_frac: float = _s(0.2, "schedule=wsd: share of the steps spent decaying, in [0, 1]")
    weight_decay: float = _s(0.1, "AdamW decoupled weight decay (>= 0)")
    beta1: float = _s(0.9, "AdamW beta1, in [0, 1)")
    beta2: float = _s(0.95, "AdamW beta2, in [0, 1)")
    grad_clip: float | None = _s(1.0, "clip the global gradient norm to this; null = no clipping", legacy_off=0.0)
    z_loss: float = _s(0.0, "coefficient of the z-loss, logsumexp(logits)^2 per target (pretraining); 0 = off, "
                            "1e-4 typical")
    seed: int = _s(1337, "seed of the initialisation, data order and sampling")
    device: str = _s("auto", "auto | cpu | cuda (cuda:N) | mps")
    compile: bool = _s(False, "torch.compile the model (per transformer block under torchrun)")
    parallel: str = _s("fsdp", "under torchrun: fsdp (FSDP2, sharded) | ddp (replicated)")
    activation_checkpointing: bool = _s(False, "recompute block activations in backward: less memory, ~30% more "
                                               "compute")
    eval_every: int | None = _s(100, "evaluate every this many steps (and at the end); null = only at the end")
    eval_batches: int = _s(8, "validation batches per evaluation")
    ckpt_every: int | None = _s(100, "checkpoint every this many steps (and at the end); null = only at the end")
    keep_last: int | None = _s(2, "checkpoints kept (older ones are removed); null = keep all", legacy_off=0)
    log_every: int = _s(10, "log the training loss every this many steps")
    max_minutes: float | None = _s(None, "stop (and checkpoint) after this many minutes; null = no limit",
                                   legacy_off=0.0)
    wandb: bool = _s(False, "also log to Weights & Biases (needs the wandb package)")
    prefetch: int = _s(2, "batches drawn ahead on a background thread (pinned memory on CUDA); 0 = draw in the step")
    async_checkpoint: bool = _s(True, "under torchrun: write DCP shards in the background (final checkpoints wait)")
    dist_timeout_minutes: float = _s(10.0, "how long a collective may wait before the job is aborted (NCCL "
                                           "watchdog)")


@dataclass
class DataConfig:
    """Where tokens come from."""

    corpus: str = _s("starter", "corpus spec: starter, a file or folder, hf:NAME[:CONFIG][@SPLIT], or a weighted "
                                "mix a.jsonl:0.7,b.txt:0.3")
    vocab_size: int = _s(4096, "tokenizer vocabulary to train (<= model.vocab_size)")
    val_fraction: float = _s(0.05, "share of documents held out for validation, in [0, 1)")
    max_chars_per_doc: int = _s(100_000, "longer documents are cut to this many characters")
    max_total_chars: int = _s(200_000_000, "stop reading the corpus after this many characters")
    split_chars: int | None = _s(None, "split longer documents at paragraph boundaries before sharding; null = "
                                       "never split", legacy_off=0)


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
        # Two Newton-Schulz iterations, not PyTorch's five: at 2,048 tokens a step they are a large share of the
        # step's compute (21% at five), and at this size two learn as much per token (docs/benchmarks.md).
        "train": dict(seq_len=256, micro_batch_size=8, max_steps=400, optimizer="muon", lr=3e-3, muon_lr=0.01,
                      muon_ns_steps=2, embed_lr=1e-2, warmup_steps=20, schedule="wsd", decay_frac=0.3, min_lr_ratio=0.0,
                      eval_every=100, ckpt_every=100),
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

# Post-training presets: what a stage layers on its base preset (the base's batch shape and device stay), plus
# the stage's own options (the defaults of its command-line flags). Fine-tuning keeps AdamW with a cosine decay
# whatever the base's pretraining recipe (Muon, WSD) is, a smaller peak learning rate, a short warmup and no
# weight decay; `--set train.optimizer=muon` switches it. `seq_len: None` = the checkpoint's own context, and
# `max_steps: None` = derived from `epochs` passes over the data. Distillation trains a fresh student of the
# `nano` shape with nano's own schedule.
STAGE_PRESETS: dict[str, dict[str, Any]] = {
    "sft": {"base": "cpu-tiny",
            "train": dict(optimizer="adamw", schedule="cosine", lr=1e-3, min_lr_ratio=0.1, warmup_steps=10,
                          weight_decay=0.0, seq_len=None, max_steps=None, eval_every=50, ckpt_every=100,
                          log_every=10),
            "options": {"epochs": 3.0}},
    "dpo": {"base": "cpu-tiny",
            "train": dict(optimizer="adamw", schedule="cosine", lr=2e-4, min_lr_ratio=0.1, warmup_steps=5,
                          weight_decay=0.0, seq_len=None, max_steps=None, eval_every=25, ckpt_every=100,
                          log_every=5),
            "options": {"epochs": 2.0, "beta": 0.1}},
    "distill": {"base": "nano", "train": {}, "options": {"alpha": 0.9, "temperature": 1.0}},
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    cfg = from_dict(RunConfig(), PRESETS[name])
    cfg.preset = name
    return cfg


def stage_options(stage: str) -> dict[str, Any]:
    """The defaults of a post-training stage's own options (epochs, beta, alpha, temperature)."""
    return dict(STAGE_PRESETS[stage]["options"])


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
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value) if isinstance(value, int) else int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(obj: Any, data: dict[str, Any], prefix: str = "") -> Any:
    """Update dataclass `obj` in place from a nested dict; unknown keys raise with their dotted name. A setting's
    `legacy_off` value (what older files wrote for "off") is read as None."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}; known: {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of settings, got {value!r}")
            from_dict(current, value, prefix=dotted + ".")
            continue
        value = _coerce(value, hints[key], dotted)
        legacy = fields[key].metadata.get("legacy_off")
        if legacy is not None and value == legacy:
            value = None
        setattr(obj, key, value)
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> dict[str, Any]:
    """`train.lr=1e-3` -> {"train": {"lr": 0.001}}. Values are parsed as YAML scalars (`null` = off)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {text}: expected a dotted key such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{key}: cannot read the value {raw!r} ({problem})") from None
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_recipe(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MissingPathError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {p} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {p}: invalid YAML{where} ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {p} must be a YAML mapping")
    return data


def resolve(preset_name: str | None = None, recipe: str | Path | None = None,
            overrides: list[str] | None = None, *, stage: str | None = None) -> RunConfig:
    """Preset, then the `stage`'s preset (sft, dpo, distill), then recipe (which may name its own `preset:`), then
    overrides; validated (a `train.seq_len` of null stays null until the model is known: see `complete`)."""
    recipe_data = load_recipe(recipe) if recipe else {}
    stage_preset = STAGE_PRESETS[stage] if stage else {"base": "cpu-tiny", "train": {}}
    name = preset_name or recipe_data.pop("preset", None) or stage_preset["base"]
    recipe_data.pop("preset", None)
    cfg = preset(name)
    from_dict(cfg.train, stage_preset["train"], prefix="train.")
    from_dict(cfg, recipe_data)
    for o in overrides or []:
        from_dict(cfg, parse_override(o))
    # SFT and DPO take their model from the checkpoint: train.seq_len is checked against it in `complete`.
    validate(cfg, stage=stage or "pretrain", model_known=stage not in EPOCH_STAGES)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# The one validate(): every rule about settings, each stated once. It reports the first problem, naming its key.

EPOCH_STAGES = ("sft", "dpo")  # stages that can derive train.max_steps from a number of epochs

Problems = list[str]


def _positive(problems: Problems, obj: Any, prefix: str, names: str, *, optional: bool = False) -> None:
    for name in names.split():
        v = getattr(obj, name)
        if v is None and optional:
            continue
        if v is None or not v > 0:
            problems.append(f"{prefix}{name}={v!r} must be positive{' or null' if optional else ''}")


def _within(problems: Problems, key: str, v: float, lo: float, hi: float, hi_open: bool = False) -> None:
    if not (lo <= v < hi if hi_open else lo <= v <= hi):
        problems.append(f"{key}={v!r} must be in [{lo}, {hi}{')' if hi_open else ']'}")


def _one_of(problems: Problems, key: str, v: str, choices: tuple[str, ...]) -> None:
    if v not in choices:
        problems.append(f"{key}={v!r}: choose one of {', '.join(choices)}")


def _model_problems(m: ModelConfig, p: str = "model.") -> Problems:
    problems: Problems = []
    _positive(problems, m, p, "vocab_size dim n_layers n_heads n_kv_heads ffn_dim max_seq_len rope_theta norm_eps "
                              "init_std")
    if problems:
        return problems  # the divisibility rules below need positive sizes
    if m.dim % m.n_heads:
        problems.append(f"{p}dim={m.dim} is not divisible by {p}n_heads={m.n_heads}")
    elif m.head_dim % 2:
        problems.append(f"{p}dim / {p}n_heads = head_dim={m.head_dim} must be even for rotary embeddings")
    if m.n_heads % m.n_kv_heads:
        problems.append(f"{p}n_heads={m.n_heads} is not a multiple of {p}n_kv_heads={m.n_kv_heads}")
    return problems


def _train_problems(t: TrainConfig, m: ModelConfig, stage: str, model_known: bool) -> Problems:
    problems: Problems = []
    _positive(problems, t, "train.", "micro_batch_size lr muon_lr muon_ns_steps eval_batches log_every "
                                     "dist_timeout_minutes")
    _positive(problems, t, "train.", "seq_len tokens_per_step max_steps embed_lr head_lr norm_lr grad_clip "
                                     "eval_every ckpt_every keep_last max_minutes", optional=True)
    if t.max_steps is None and stage not in EPOCH_STAGES:
        problems.append("train.max_steps=null derives the length from --epochs, which only sft and dpo have; "
                        "give a number of steps")
    if model_known and t.seq_len is not None and t.seq_len > m.max_seq_len:
        problems.append(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len} (null = the model's "
                        "context)")
    for name in ("warmup_steps", "weight_decay", "muon_weight_decay", "prefetch", "z_loss"):
        if getattr(t, name) < 0:
            problems.append(f"train.{name}={getattr(t, name)!r} must be >= 0")
    _within(problems, "train.min_lr_ratio", t.min_lr_ratio, 0, 1)
    _within(problems, "train.decay_frac", t.decay_frac, 0, 1)
    for name in ("beta1", "beta2", "muon_momentum"):
        _within(problems, f"train.{name}", getattr(t, name), 0, 1, hi_open=True)
    _one_of(problems, "train.optimizer", t.optimizer, ("adamw", "muon"))
    _one_of(problems, "train.schedule", t.schedule, ("cosine", "wsd"))
    _one_of(problems, "train.parallel", t.parallel, ("fsdp", "ddp"))
    if not (t.device in ("auto", "cpu", "cuda", "mps") or t.device.startswith("cuda:")):
        problems.append(f"train.device={t.device!r}: choose auto, cpu, cuda, cuda:N or mps")
    return problems


def _data_problems(d: DataConfig, m: ModelConfig, stage: str) -> Problems:
    problems: Problems = []
    if stage in EPOCH_STAGES:  # their data is chat/preference files, tokenized by the checkpoint's own tokenizer
        return problems
    _positive(problems, d, "data.", "vocab_size max_chars_per_doc max_total_chars")
    _positive(problems, d, "data.", "split_chars", optional=True)
    _within(problems, "data.val_fraction", d.val_fraction, 0, 1, hi_open=True)
    if not d.corpus.strip():
        problems.append("data.corpus is empty; name a corpus spec (e.g. starter)")
    if m.vocab_size < d.vocab_size:
        problems.append(f"model.vocab_size={m.vocab_size} < data.vocab_size={d.vocab_size}")
    return problems


def _raise_first(problems: Problems) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


def validate(cfg: RunConfig, *, stage: str = "pretrain", model_known: bool = True) -> RunConfig:
    """Check every rule about a run's settings; raise one `ConfigError` naming the first bad key.

    `stage` (pretrain, sft, dpo, distill): SFT and DPO derive `train.max_steps` from their epochs, so null is
    allowed there, and their data settings are not used (they read chat/preference files with the checkpoint's
    tokenizer). `model_known=False`: cfg.model is a placeholder (the model will come from a checkpoint), so the
    rules that tie train to model wait for `complete`. Returns `cfg` unchanged, for chaining."""
    problems = _model_problems(cfg.model)
    if not problems:
        problems = (_train_problems(cfg.train, cfg.model, stage, model_known)
                    + _data_problems(cfg.data, cfg.model, stage))
    _raise_first(problems)
    return cfg


def validate_options(stage: str, options: dict[str, Any]) -> None:
    """The rules of a post-training stage's own options (their defaults are in STAGE_PRESETS)."""
    problems: Problems = []
    if "epochs" in options and not options["epochs"] > 0:
        problems.append(f"epochs must be positive, got {options['epochs']} (or set train.max_steps)")
    if "beta" in options and not options["beta"] > 0:
        problems.append(f"beta must be positive, got {options['beta']}")
    if "alpha" in options and not 0 <= options["alpha"] <= 1:
        problems.append(f"alpha must be in [0, 1], got {options['alpha']}")
    if "temperature" in options and not options["temperature"] > 0:
        problems.append(f"temperature must be positive, got {options['temperature']}")
    _raise_first(problems)


def complete(cfg: RunConfig, *, stage: str = "pretrain") -> RunConfig:
    """Validate a run whose model is now known (a stage that starts from a checkpoint takes its model config from
    there), then fill the settings whose null means "the model's": `train.seq_len` = `model.max_seq_len`."""
    validate(cfg, stage=stage)
    if cfg.train.seq_len is None:
        cfg.train.seq_len = cfg.model.max_seq_len
    return cfg


# ---------------------------------------------------------------------------------------------------------
# What each setting means, from the one place it is written (the fields' `help`).


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return "|".join("null" if a is type(None) else a.__name__ for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def settings_table(cfg: RunConfig | None = None, sections: tuple[str, ...] = ("model", "train", "data"), *,
                   stage: str | None = None) -> str:
    """One line per setting: dotted key, type, value in `cfg` (else the default preset, under `stage`'s preset when
    given), meaning."""
    if cfg is None:
        cfg = preset(STAGE_PRESETS[stage]["base"] if stage else "cpu-tiny")
        if stage:
            from_dict(cfg.train, STAGE_PRESETS[stage]["train"], prefix="train.")
    rows = []
    for section in sections:
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            shown = "null" if value is None else json.dumps(value)
            rows.append((f"{section}.{f.name}", _type_name(hints[f.name]), shown, f.metadata.get("help", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"  {k:<{widths[0]}}  {t:<{widths[1]}}  {v:<{widths[2]}}  {h}" for k, t, v, h in rows)


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
