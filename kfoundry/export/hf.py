"""Export a checkpoint as a Hugging Face `LlamaForCausalLM` directory.

Our parameter names already are Hugging Face's, so the weights are written as they are; the work here is the
config translation and the tokenizer files `transformers` expects. The exported directory loads offline with
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`; the tests prove logits
agree with ours to 1e-5 in fp32 and token ids agree.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from kfoundry.checkpoint import load_config, load_model, load_tokenizer, model_state
from kfoundry.config import ModelConfig
from kfoundry.errors import CheckpointError
from kfoundry.fileio import atomic_dir, atomic_write_json
from kfoundry.provenance.card import write_model_card
from kfoundry.provenance.record import record_export


def hf_config(cfg: ModelConfig, tok) -> dict:
    """LlamaConfig fields for our ModelConfig. Refuses what Llama cannot represent."""
    if cfg.qk_norm:
        raise CheckpointError("this model uses QK-norm, which Hugging Face LlamaForCausalLM cannot represent; "
                              "train with model.qk_norm=false to export as Llama")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5 reads this
        "rope_parameters": rope,  # transformers >= 5 reads this
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def hf_tokenizer_json(tok) -> str:
    """Our tokenizer.json with a post-processor that prepends BOS, as Llama-3's does: `AutoTokenizer(text)` then
    gives the same ids as `tok.encode(text, bos=True)`, which is how every training document starts."""
    hf = Tokenizer.from_str(tok.hf.to_str())
    bos = tok.hf.id_to_token(tok.bos_id)
    hf.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                           special_tokens=[(bos, tok.bos_id)])
    return hf.to_str(pretty=False)


def export_hf(ckpt: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    ckpt, out = Path(ckpt), Path(out)
    cfg = load_config(ckpt)
    tok = load_tokenizer(ckpt)
    config = hf_config(cfg, tok)
    model = load_model(ckpt)
    name = lambda i: tok.hf.id_to_token(i)  # noqa: E731
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "config.json", config)
        save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(hf_tokenizer_json(tok), encoding="utf-8")
        atomic_write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(tok.bos_id),
            "eos_token": name(tok.eos_id),
            "pad_token": name(tok.pad_id),
            "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,
            "chat_template": tok.chat_template,
        })
        atomic_write_json(tmp / "special_tokens_map.json", {
            "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id)})
        (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
        atomic_write_json(tmp / "generation_config.json", {
            "bos_token_id": tok.bos_id,
            # A chat turn ends with <|eot_id|>; plain text ends with <|end_of_text|>.
            "eos_token_id": sorted({tok.eos_id, tok.eot_id}),
            "pad_token_id": tok.pad_id,
            "max_length": cfg.max_seq_len,
        })
        (tmp / "kfoundry_source.json").write_text(json.dumps({"checkpoint": str(ckpt.resolve())}) + "\n")
        write_model_card(ckpt, tmp)  # README.md: data, compute, evaluation, lineage, limitations (EN + KO)
    record_export(ckpt, out, fmt="hf")
    return out
