"""Import a Hugging Face Llama-family checkpoint (a local directory) as a kfoundry checkpoint.

For users who build on a permitted reference model. Only what our model computes *exactly* is accepted:
`LlamaForCausalLM` and `MistralForCausalLM` whose config maps field for field onto `ModelConfig`. Anything that
changes the computation and that we cannot represent is refused, and the error lists every such field at once
(so a user fixes the config or picks another model in one go), for example:

    sliding_window          Mistral's local attention; ours is full causal attention. A window at least as long
                            as max_position_embeddings never bites, so that case is accepted.
    rope_scaling / rope_type != default   (linear, dynamic, YaRN, Llama-3 frequency scaling)
    attention_bias, mlp_bias              (our projections have no biases)
    head_dim != hidden_size / num_attention_heads
    hidden_act other than silu, attention_dropout > 0, quantization_config, partial_rotary_factor < 1

Fields that do not change the computation (token ids, `use_cache`, `torch_dtype`, `pretraining_tp`, which only
splits the same matmuls into slices) are ignored. Our parameter names are Hugging Face's, so the weights map by
name; they are read from safetensors only (never pickles) and converted to fp32, our master precision.

The imported checkpoint is marked as derived from external weights: `meta.json` holds
`derived_from_external: true` and `external_source` with the source directory, the sha256 of its config.json and
of its weight files. `kfoundry upscale` and the provenance ledger carry this mark forward; a model built on
outside weights is never presented as from-scratch.

The tokenizer: a checkpoint needs a kfoundry tokenizer (with our special tokens). One is taken from `--tokenizer
DIR`, else from the source's tokenizer.json when it is compatible (e.g. a kfoundry model exported with
`kfoundry export hf`); otherwise the checkpoint is written without one and the caller is told why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from kfoundry.checkpoint import save_checkpoint
from kfoundry.config import ModelConfig
from kfoundry.errors import CheckpointError, ConfigError, MissingPathError
from kfoundry.fileio import read_json, sha256_bytes, sha256_file
from kfoundry.model.llama import Transformer
from kfoundry.provenance import record_checkpoint
from kfoundry.tokenizer import KTokenizer

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Buffers some older exports saved next to the weights; they are functions of the config, recomputed here.
DERIVED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


class UnsupportedConfigError(CheckpointError):
    """The source config asks for something our model cannot compute exactly; `.fields` names each problem."""

    def __init__(self, source: str, fields: dict[str, str]):
        self.fields = fields
        listed = "; ".join(f"{k} ({why})" for k, why in fields.items())
        super().__init__(f"{source} cannot be imported exactly; unsupported fields: {listed}")


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, str]]:
    """rope_theta and any unsupported RoPE variant, from either transformers 4.x (`rope_theta`, `rope_scaling`)
    or 5.x (`rope_parameters`) config layouts."""
    problems: dict[str, str] = {}
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", "default")
    if kind != "default":
        problems["rope_parameters.rope_type"] = f"{kind!r}; only the default (unscaled) RoPE is supported"
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "?")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            problems["rope_scaling"] = f"{kind!r}; only the default (unscaled) RoPE is supported"
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        problems["partial_rotary_factor"] = f"{factor}; RoPE must cover the whole head"
    return float(theta), problems


def model_config_from_hf(hf: dict[str, Any], source: str = "the config") -> ModelConfig:
    """Translate a Hugging Face config.json (as a dict) into our ModelConfig, or raise UnsupportedConfigError
    listing every field that would make our model compute something else."""
    problems: dict[str, str] = {}
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES.values():
        problems["model_type"] = f"{model_type!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES.values()))}"
    bad_archs = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad_archs or len(archs) > 1:
        problems["architectures"] = f"{archs}; supported: one of {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"

    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for key in required:
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            problems[key] = f"{hf.get(key)!r}; a positive integer is required"
    if problems.keys() & set(required):
        raise UnsupportedConfigError(source, problems)

    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or dim // heads
    if dim % heads or head_dim != dim // heads:
        problems["head_dim"] = f"{head_dim} != hidden_size / num_attention_heads = {dim}/{heads}"
    if heads % kv_heads:
        problems["num_key_value_heads"] = f"{kv_heads} does not divide num_attention_heads={heads}"
    theta, rope_problems = _rope(hf)
    problems.update(rope_problems)
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems[key] = "true; our projections have no biases"
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems["hidden_act"] = f"{act!r}; the MLP is SwiGLU (silu)"
    if hf.get("attention_dropout"):
        problems["attention_dropout"] = f"{hf['attention_dropout']}; our attention has no dropout"
    if hf.get("quantization_config"):
        problems["quantization_config"] = "quantized weights; import the full-precision checkpoint"
    max_pos = int(hf.get("max_position_embeddings") or 2048)
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True) and int(window) < max_pos:
        problems["sliding_window"] = (f"{window} < max_position_embeddings={max_pos}; our attention is full causal "
                                      "attention (sliding-window attention is not supported)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems["layer_types"] = f"{sorted(set(layer_types))}; only full_attention layers are supported"
    if problems:
        raise UnsupportedConfigError(source, problems)

    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=kv_heads,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=max_pos,
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=False,
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    try:
        cfg.validate()
    except ValueError as e:  # e.g. an odd head_dim, which rotary embeddings cannot split in halves
        raise UnsupportedConfigError(source, {"head_dim": str(e)}) from None
    return cfg


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards its index names)."""
    if (hf_dir / SAFE_INDEX).is_file():
        index = read_json(hf_dir / SAFE_INDEX)
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{hf_dir / SAFE_INDEX} names no weight files")
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing:
            raise MissingPathError(f"{hf_dir}: weight shards named in {SAFE_INDEX} are missing: {missing}")
        return [hf_dir / n for n in names]
    if (hf_dir / SAFE_WEIGHTS).is_file():
        return [hf_dir / SAFE_WEIGHTS]
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")) or any(hf_dir.glob("*.pth")):
        raise CheckpointError(f"{hf_dir} holds pickled PyTorch weights only; kfoundry reads safetensors "
                              "(never pickles). Re-save with save_pretrained(dir, safe_serialization=True)")
    raise MissingPathError(f"{hf_dir} has no {SAFE_WEIGHTS} or {SAFE_INDEX}")


def read_weights(files: list[Path]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All tensors from the files, converted to fp32, plus the source dtypes (for the record)."""
    tensors: dict[str, torch.Tensor] = {}
    dtypes: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key in tensors:
                    raise CheckpointError(f"tensor {key!r} appears in more than one weight file")
                t = handle.get_tensor(key)
                dtypes.add(str(t.dtype).removeprefix("torch."))
                tensors[key] = t.float() if t.is_floating_point() else t
    return tensors, sorted(dtypes)


def map_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Check the source tensors against the names and shapes our model expects and return our state dict.

    Names are identical (ours follow LlamaForCausalLM). A tied model stores the head once (as the embedding);
    a source that also stores `lm_head.weight` for a tied config must store the same matrix.
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    state = {k: v for k, v in tensors.items() if not k.endswith(DERIVED_KEY_SUFFIXES)}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        head = state.pop("lm_head.weight", None)
        emb = state.get("model.embed_tokens.weight")
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise CheckpointError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from the "
                                  "embedding")
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match a Llama model of this config "
                              f"(missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''})")
    wrong = {k: (tuple(state[k].shape), shape) for k, shape in expected.items() if tuple(state[k].shape) != shape}
    if wrong:
        k, (got, want) = next(iter(wrong.items()))
        raise CheckpointError(f"{source}: {len(wrong)} tensors have the wrong shape, e.g. {k}: {got} != {want}")
    return state


def _compatible_tokenizer(hf_dir: Path, tokenizer: str | Path | None, vocab_size: int):
    """(KTokenizer or None, why there is none). An explicit tokenizer must load; the source's own is optional."""
    if tokenizer is not None:
        tok = KTokenizer.load(tokenizer)
    elif (hf_dir / "tokenizer.json").is_file():
        text = (hf_dir / "tokenizer.json").read_text(encoding="utf-8")
        try:
            tok = KTokenizer(Tokenizer.from_str(text), json_text=text)
        except ValueError as e:
            return None, f"its tokenizer.json is not a kfoundry tokenizer ({e})"
    else:
        return None, "it has no tokenizer.json"
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    return tok, None


def import_hf(hf_dir: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
              overwrite: bool = False) -> tuple[Path, str | None]:
    """Convert the Hugging Face model directory `hf_dir` into a kfoundry checkpoint at `out`.

    Returns (checkpoint path, note): the note says why no tokenizer was attached, or is None when one was.
    Raises UnsupportedConfigError (a ValueError) for a config our model cannot represent exactly.
    """
    hf_dir = Path(hf_dir)
    if Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    if not hf_dir.is_dir():
        raise MissingPathError(f"Hugging Face model directory not found: {hf_dir}")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise MissingPathError(f"{hf_dir} has no config.json (not a Hugging Face model directory)")
    try:
        hf = read_json(config_path)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
    cfg = model_config_from_hf(hf, source=str(hf_dir))
    files = weight_files(hf_dir)
    tok, note = _compatible_tokenizer(hf_dir, tokenizer, cfg.vocab_size)

    tensors, dtypes = read_weights(files)
    state = map_state_dict(tensors, cfg, str(hf_dir))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # rotary buffer and the tie; every weight is overwritten just below
    model.load_state_dict(state, strict=not cfg.tie_embeddings)

    hashes = {f.name: sha256_file(f) for f in files}
    meta = {
        "stage": "import",
        "parent": None,
        "derived_from_external": True,
        "external_source": {
            "format": "huggingface",
            "path": str(hf_dir.resolve()),
            "name_or_path": hf.get("_name_or_path"),
            "architectures": hf.get("architectures"),
            "model_type": hf.get("model_type"),
            "transformers_version": hf.get("transformers_version"),
            "config_sha256": sha256_file(config_path),
            # One digest for all weights: the sha256 of the sorted "name sha256" lines (a single file's own hash
            # is in weight_files too), so a provenance check can compare one string.
            "weights_sha256": sha256_bytes("".join(f"{n} {h}\n" for n, h in sorted(hashes.items())).encode()),
            "weight_files": hashes,
            "source_dtypes": dtypes,
            "tokenizer": str(Path(tokenizer).resolve()) if tokenizer is not None else
            ("tokenizer.json" if tok is not None else None),
        },
    }
    path = save_checkpoint(out, model, tok, meta=meta, overwrite=overwrite)
    record_checkpoint(path)  # provenance ledger: derived from external weights, with the source's identity
    return path, note
