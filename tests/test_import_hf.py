"""`kfoundry import hf`: a locally saved LlamaForCausalLM / MistralForCausalLM imports with logits within 1e-5,
configs we cannot represent are refused with every offending field named, and the checkpoint is marked as
derived from external weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kfoundry.checkpoint import load_config, load_model, load_tokenizer, read_meta, save_checkpoint, verify
from kfoundry.cli import main
from kfoundry.config import ModelConfig
from kfoundry.fileio import sha256_bytes, sha256_file
from kfoundry.convert.import_hf import UnsupportedConfigError, import_hf, model_config_from_hf
from kfoundry.model.llama import Transformer
from kfoundry.text import nfc

# Shapes a reference model may have: GQA with a tied head, MHA untied with a non-default theta and sharded
# weights, Mistral without a sliding window, and bf16 weights.
SOURCES = {
    "llama-gqa-tied": dict(kind="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-mha-untied-sharded": dict(kind="llama", num_attention_heads=4, num_key_value_heads=4,
                                     tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                                     shard="40KB"),
    "mistral-gqa-untied": dict(kind="mistral", num_attention_heads=8, num_key_value_heads=2,
                               tie_word_embeddings=False, sliding_window=None),
    "llama-mqa-bf16": dict(kind="llama", num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                           dtype=torch.bfloat16),
}


def hf_model(kind: str, seed: int = 0, **kw):
    """A randomly initialised HF model with non-trivial norms (so a mis-mapped norm cannot hide)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    theta = kw.pop("rope_theta", 10000.0)
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    shape = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 max_position_embeddings=128)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape, **rope, **kw))
    else:
        model = MistralForCausalLM(MistralConfig(**shape, **rope, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(SOURCES))
def imported(request, tmp_path_factory):
    spec = dict(SOURCES[request.param])
    kind, shard, dtype = spec.pop("kind"), spec.pop("shard", None), spec.pop("dtype", None)
    base = tmp_path_factory.mktemp(request.param)
    model = hf_model(kind, **spec)
    if dtype is not None:
        model = model.to(dtype)
    src = base / "hf"
    model.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    out = base / "ckpt"
    assert main(["import", "hf", "--model", str(src), "--out", str(out)]) == 0
    return request.param, src, out


def test_logits_match_within_1e5(imported):
    from transformers import AutoModelForCausalLM

    name, src, out = imported
    hf = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=torch.float32).eval()
    ours = load_model(out).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (3, 40), generator=gen)
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), f"{name}: max diff {(a - b).abs().max()}"
    cfg = load_config(out)
    assert cfg.n_kv_heads == hf.config.num_key_value_heads and cfg.tie_embeddings == hf.config.tie_word_embeddings
    if name.endswith("sharded"):
        assert (src / "model.safetensors.index.json").is_file()


def test_checkpoint_is_marked_external(imported):
    name, src, out = imported
    verify(out)
    meta = read_meta(out)
    assert meta["stage"] == "import" and meta["derived_from_external"] is True and meta["parent"] is None
    ext = meta["external_source"]
    assert ext["path"] == str(src.resolve()) and ext["format"] == "huggingface"
    assert ext["config_sha256"] == sha256_file(src / "config.json")
    files = sorted(src.glob("*.safetensors"))
    assert ext["weight_files"] == {f.name: sha256_file(f) for f in files}
    assert ext["weights_sha256"] == sha256_bytes("".join(f"{f.name} {sha256_file(f)}\n" for f in files).encode())
    assert ext["source_dtypes"] == (["bfloat16"] if "bf16" in name else ["float32"])
    assert ext["tokenizer"] is None and not (out / "tokenizer").exists()


def test_round_trip_of_an_exported_kfoundry_model(tmp_path, mixed_texts, capsys):
    """kfoundry -> export hf -> import hf gives back the same weights, and the tokenizer comes along."""
    from kfoundry.export.hf import export_hf
    from kfoundry.tokenizer import train_tokenizer

    tok = train_tokenizer([nfc(t) for t in mixed_texts if t] * 20, 300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=64, tie_embeddings=True)
    ckpt = save_checkpoint(tmp_path / "ckpt", Transformer.build(cfg, seed=0), tok)
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    back = tmp_path / "back"
    assert main(["import", "hf", "--model", str(hf_dir), "--out", str(back)]) == 0
    assert "no tokenizer attached" not in capsys.readouterr().err
    assert load_config(back) == cfg
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok_back = load_tokenizer(back)
    for text in mixed_texts:
        assert tok_back.encode(text, bos=True) == tok.encode(text, bos=True), text
        assert tok_back.decode(tok.encode(text)) == nfc(text)
    assert read_meta(back)["external_source"]["tokenizer"] == "tokenizer.json"


def test_explicit_tokenizer_and_missing_tokenizer_note(tmp_path, capsys):
    from kfoundry.tokenizer import train_tokenizer

    src = tmp_path / "hf"
    hf_model("llama", num_attention_heads=4, num_key_value_heads=2).save_pretrained(src)
    capsys.readouterr()
    assert main(["import", "hf", "--model", str(src), "--out", str(tmp_path / "a")]) == 0
    assert "no tokenizer attached: it has no tokenizer.json" in capsys.readouterr().err

    small = train_tokenizer(["안녕하세요 hello 123 😀"] * 10, 280)
    small.save(tmp_path / "tok")
    assert main(["import", "hf", "--model", str(src), "--out", str(tmp_path / "b"),
                 "--tokenizer", str(tmp_path / "tok")]) == 0
    assert load_tokenizer(tmp_path / "b").hash == small.hash

    big = train_tokenizer(["안녕하세요 hello 123 😀 " + " ".join(map(str, range(2000)))] * 10, 400)
    big.save(tmp_path / "bigtok")
    assert main(["import", "hf", "--model", str(src), "--out", str(tmp_path / "c"),
                 "--tokenizer", str(tmp_path / "bigtok")]) == 2
    assert "vocab_size is 320" in capsys.readouterr().err and not (tmp_path / "c").exists()


BASE = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=320, hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)


def test_config_mapping_both_transformers_layouts():
    v4 = model_config_from_hf({**BASE, "rope_theta": 123.0, "rope_scaling": None, "head_dim": 16})
    v5 = model_config_from_hf({**{k: v for k, v in BASE.items() if k != "rope_theta"},
                               "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}})
    assert v4 == v5 == ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                   max_seq_len=128, rope_theta=123.0, norm_eps=1e-6)
    # A Mistral window as long as the context never bites: accepted.
    mistral = {**BASE, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 128}
    assert model_config_from_hf(mistral).n_layers == 2
    assert model_config_from_hf({**BASE, "num_key_value_heads": None}).n_kv_heads == 4


def test_unsupported_fields_are_all_listed():
    bad = {**BASE, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 16,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "attention_bias": True, "mlp_bias": True,
           "head_dim": 32, "hidden_act": "gelu", "attention_dropout": 0.1}
    with pytest.raises(UnsupportedConfigError) as e:
        model_config_from_hf(bad, source="ref")
    assert set(e.value.fields) == {"sliding_window", "rope_scaling", "attention_bias", "mlp_bias", "head_dim",
                                   "hidden_act", "attention_dropout"}
    for field in e.value.fields:
        assert field in str(e.value)
    assert "sliding_window (16 < max_position_embeddings=128" in str(e.value)
    v5_scaled = {**BASE, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}
    with pytest.raises(UnsupportedConfigError, match="rope_parameters.rope_type"):
        model_config_from_hf(v5_scaled)
    with pytest.raises(UnsupportedConfigError, match="model_type .*'qwen2'"):
        model_config_from_hf({**BASE, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    with pytest.raises(UnsupportedConfigError, match="architectures"):
        model_config_from_hf({**BASE, "architectures": ["LlamaForSequenceClassification"]})
    with pytest.raises(UnsupportedConfigError, match="hidden_size"):
        model_config_from_hf({**BASE, "hidden_size": None})


def test_cli_refuses_unsupported_and_broken_sources(tmp_path, capsys):
    src = tmp_path / "mistral"
    hf_model("mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=16).save_pretrained(src)
    out = tmp_path / "out"
    capsys.readouterr()  # drop save_pretrained's progress bar
    assert main(["import", "hf", "--model", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unsupported fields: sliding_window" in err and not out.exists()

    assert main(["import", "hf", "--model", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(BASE))
    torch.save({}, pickled / "pytorch_model.bin")
    assert main(["import", "hf", "--model", str(pickled), "--out", str(out)]) == 2
    assert "safetensors (never pickles)" in capsys.readouterr().err

    # Weights that do not fit the config are named, not silently half-loaded.
    good = tmp_path / "good"
    hf_model("llama", num_attention_heads=4, num_key_value_heads=2).save_pretrained(good)
    state = load_file(str(good / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(good / "model.safetensors"))
    capsys.readouterr()
    assert main(["import", "hf", "--model", str(good), "--out", str(out)]) == 2
    assert "missing ['model.layers.1.mlp.up_proj.weight']" in capsys.readouterr().err and not out.exists()

    tied = tmp_path / "tied"
    hf_model("llama", num_attention_heads=4, num_key_value_heads=2).save_pretrained(tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    capsys.readouterr()
    assert main(["import", "hf", "--model", str(tied), "--out", str(out)]) == 2
    assert "lm_head.weight differs from the embedding" in capsys.readouterr().err

    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["import", "hf", "--model", str(src), "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_import_is_deterministic(tmp_path):
    src = tmp_path / "hf"
    hf_model("llama", num_attention_heads=4, num_key_value_heads=2).save_pretrained(src)
    a, _ = import_hf(src, tmp_path / "a")
    b, _ = import_hf(src, tmp_path / "b")
    assert (Path(a) / "model.safetensors").read_bytes() == (Path(b) / "model.safetensors").read_bytes()
    assert read_meta(a)["external_source"] == read_meta(b)["external_source"]
