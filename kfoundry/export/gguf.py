"""Export a checkpoint as a GGUF file that llama.cpp (and everything built on it) runs directly.

GGUF is one file: a header of typed key/value metadata (architecture, shapes, the whole tokenizer, the chat
template) followed by the tensors, each in its own storage type. We write it with the `gguf` package (the
reference writer maintained in the llama.cpp repository) straight from our checkpoint, without going through
a Hugging Face directory first. Four things need care, and `tests/test_gguf.py` proves each with llama.cpp:

1. Names. Our parameters carry Hugging Face Llama names; `gguf`'s own tensor-name map turns them into
   llama.cpp's (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`).
2. Rotary layout. We (like Hugging Face) rotate pairs (j, j + head_dim/2) -- the `rotate_half` layout.
   llama.cpp's llama architecture rotates adjacent pairs (2j, 2j+1). Reordering the output rows of the q and k
   projections inside each head, so that row j+head_dim/2 sits right after row j, makes llama.cpp rotate
   exactly the pairs we rotate. q and k get the same reordering, so every q.k dot product (and therefore
   attention) is unchanged; v and the output projection are untouched. `permute_for_rope` does this.
3. Tokenizer. Ours is byte-level BPE with the Llama-3 split regex, which llama.cpp knows as the `gpt2`
   tokenizer model with the `llama-bpe` pre-tokenizer. We store the token strings (in the byte-to-character
   form BPE uses), their types (special tokens are CONTROL, so they are matched in text and never split),
   the merges, the special ids, add-BOS, and the chat template. One difference is by design: our tokenizer
   NFC-normalizes text and llama.cpp's does not, so callers must hand llama.cpp NFC text (kfoundry.text.nfc).
4. Storage types. `--type` sets the type of the matrices; 1-D tensors (RMSNorm gains) always stay F32, as
   llama.cpp's own converter keeps them. Q8_0 and Q4_0 store blocks of 32 consecutive values of a row with one
   f16 scale each (8 and 4 bits per value, i.e. 8.5 and 4.5 bits with the scale), so every row length must be a
   multiple of 32; a model that breaks this gets an error naming the first tensor that cannot be stored. With
   q4_0 the output matrix (the tied embedding, or `output.weight`) is stored as Q8_0: the output layer is the
   most sensitive to quantization, and llama.cpp's own quantizer also keeps it at a higher precision.

Tied embeddings need nothing special: llama.cpp uses `token_embd.weight` as the output matrix when the file
has no `output.weight`, so the tied matrix is stored once, as in our checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kfoundry.checkpoint import load_config, load_model, load_tokenizer
from kfoundry.config import ModelConfig
from kfoundry.errors import CheckpointError, ConfigError, DependencyError
from kfoundry.fileio import atomic_file
from kfoundry.provenance.record import record_export
from kfoundry.tokenizer import pipeline

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
ARCH = "llama"


@dataclass
class GGUFExport:
    """What `export_gguf` wrote: the file, its size, and the storage type of every tensor."""

    path: Path
    out_type: str
    size_bytes: int
    tensor_types: dict[str, str] = field(default_factory=dict)
    n_vocab: int = 0


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a declared dependency; a clear message beats a traceback
        raise DependencyError("the `gguf` package is needed to write GGUF files: pip install gguf") from e
    return gguf


# ---------------------------------------------------------------------------------------------------------
# Weights


def permute_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a q or k projection from the rotate_half layout to llama.cpp's adjacent pairs.

    Within each head, rows [0 .. d/2) and [d/2 .. d) are interleaved: new order 0, d/2, 1, d/2+1, ...
    `n_heads` is the number of heads the matrix produces (n_kv_heads for k under grouped-query attention).
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def storage_type(gguf_name: str, shape: tuple[int, ...], out_type: str, *, is_output: bool):
    """The GGML type a tensor is stored in, or ValueError (naming the tensor) if `out_type` cannot hold it."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or out_type == "f32":
        return Q.F32
    if out_type == "f16":
        return Q.F16
    qtype = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[out_type]
    if qtype == Q.Q4_0 and is_output:
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        raise CheckpointError(
            f"tensor {gguf_name} has rows of {shape[-1]} values, but {out_type} stores blocks of {block}: every row "
            f"length (model.dim, model.ffn_dim) must be a multiple of {block}. Export with --type f16 or f32, "
            f"or train a model whose dims are multiples of {block}.")
    return qtype


def gguf_tensors(model, out_type: str) -> list[tuple[str, np.ndarray, object]]:
    """(gguf name, float32 array, storage type) for every tensor, checked before anything is written."""
    gguf = _gguf()
    cfg: ModelConfig = model.cfg
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    state = dict(model.state_dict())
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")  # llama.cpp reuses token_embd.weight when output.weight is absent
    output_matrix = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
    out = []
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise CheckpointError(f"no llama.cpp name for parameter {hf_name} (is this a kfoundry Llama checkpoint?)")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = permute_for_rope(data, cfg.n_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = permute_for_rope(data, cfg.n_kv_heads)
        qtype = storage_type(name, data.shape, out_type, is_output=name == output_matrix)
        out.append((name, np.ascontiguousarray(data), qtype))
    return out


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_fields(tok, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings and types by id, and the merges in rank order, for a vocabulary of `n_vocab` rows.

    The model may have more embedding rows than the tokenizer has tokens (vocab_size is often rounded up);
    llama.cpp needs a token for every row, so the spare rows get UNUSED placeholders that text never maps to.
    """
    gguf = _gguf()
    T = gguf.TokenType
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    if len(vocab) > n_vocab:
        raise CheckpointError(f"the tokenizer has {len(vocab)} tokens but the model only {n_vocab} embedding rows")
    tokens: list[str | None] = [None] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
    special = set(tok.special_tokens.values())
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
            types.append(int(T.UNUSED))
        else:
            types.append(int(T.CONTROL if i in special else T.NORMAL))
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    # tokenizers writes merges as "a b" strings (older) or ["a", "b"] pairs (newer); GGUF wants "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, types, merges  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# The file


def _file_type(out_type: str) -> int:
    F = _gguf().LlamaFileType
    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[out_type])


def export_gguf(ckpt: str | Path, out: str | Path, *, out_type: str = "f16", overwrite: bool = False) -> GGUFExport:
    """Write checkpoint `ckpt` as the GGUF file `out` with matrices stored as `out_type` (see GGUF_TYPES).

    The file is written next to `out` under a temporary name and renamed into place when complete.
    """
    gguf = _gguf()
    from gguf.quants import quantize

    ckpt, out = Path(ckpt), Path(out)
    out_type = out_type.lower()
    if out_type not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {out_type!r}; choose one of: {', '.join(GGUF_TYPES)}")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists (pass --overwrite to replace it)")
    if out.exists() and out.is_dir():
        raise ConfigError(f"{out} is a directory; --out names the .gguf file to write")
    cfg = load_config(ckpt)
    if cfg.qk_norm:
        raise CheckpointError("this model uses QK-norm, which llama.cpp's llama architecture cannot represent; "
                              "train with model.qk_norm=false to export as GGUF")
    tok = load_tokenizer(ckpt)
    model = load_model(ckpt)
    tensors = gguf_tensors(model, out_type)  # every shape is checked here, before the file is opened
    tokens, types, merges = tokenizer_fields(tok, cfg.vocab_size)

    with atomic_file(out) as tmp:  # a failed or killed export leaves no file that looks like a model
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_name(ckpt.resolve().name)
        w.add_file_type(_file_type(out_type))
        if out_type in ("q8_0", "q4_0"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.ffn_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)

        w.add_tokenizer_model("gpt2")  # byte-level BPE, whatever the pre-tokenizer
        w.add_tokenizer_pre(pipeline.LLAMA_CPP_PRE)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_eot_token_id(tok.eot_id)  # ends a chat turn: llama.cpp stops generating there
        w.add_add_bos_token(True)  # every training document started with BOS
        w.add_add_eos_token(False)
        w.add_chat_template(tok.chat_template)
        w.add_string("kfoundry.tokenizer_sha256", tok.hash)

        tensor_types = {}
        for name, data, qtype in tensors:
            # `storage_type` chose the type; gguf's `quantize` encodes any of ours (for F32/F16 it is the plain
            # cast) and raw_dtype names it in the tensor's header entry.
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
            tensor_types[name] = qtype.name
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    record_export(ckpt, out, fmt=f"gguf-{out_type}")  # the run's ledger: this file's sha256, tied to the weights
    return GGUFExport(path=out, out_type=out_type, size_bytes=out.stat().st_size, tensor_types=tensor_types,
                      n_vocab=cfg.vocab_size)
