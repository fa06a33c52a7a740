"""`KTokenizer`: the trained tokenizer as the rest of kfoundry sees it.

It wraps a Hugging Face `tokenizers.Tokenizer` (exposed as `.hf`) and adds what the other stages need:
NFC at the entry point, explicit BOS/EOS, the special-token ids by name, the chat template, the bytes each
token stands for (bits-per-byte needs them), and a content hash for the provenance ledger.

A tokenizer directory holds:

    tokenizer.json         the Hugging Face tokenizer (the only file a tool needs to tokenize)
    tokenizer_meta.json    special ids, the sha256 of tokenizer.json, how it was trained
    chat_template.jinja    the chat template (transformers >= 4.5x reads this file by this name)
    tokenizer_config.json  names BOS/EOS/PAD for `transformers.AutoTokenizer.from_pretrained(dir)`

Special tokens written literally in the input text ("<|eot_id|>") are encoded as the special token, as
`transformers` does; this is what makes a rendered chat template tokenize to the right ids.
"""

from __future__ import annotations

import functools

import importlib.resources
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from kfoundry.errors import CheckpointError, ConfigError, DataError, MissingPathError
from kfoundry.fileio import atomic_dir, atomic_write_json, atomic_write_text, read_json, sha256_bytes
from kfoundry.text import nfc
from kfoundry.tokenizer import pipeline

META_FORMAT = "kfoundry-tokenizer/1"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
TEMPLATE_FILE = "chat_template.jinja"
HF_CONFIG_FILE = "tokenizer_config.json"


def default_chat_template() -> str:
    """The packaged Llama-3-style template (kfoundry/tokenizer/chat_template.jinja)."""
    return importlib.resources.files("kfoundry.tokenizer").joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=8)
def compiled_template(template: str):
    """A chat template compiled once (compiling costs far more than a render; data sets render 10k+ conversations), in a
    sandboxed Jinja environment with the options `transformers` uses."""
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


class KTokenizer:
    """A byte-level BPE tokenizer with kfoundry's special tokens. Build one with `train_tokenizer` or `load`."""

    def __init__(self, hf: Tokenizer, *, chat_template: str | None = None, training: dict[str, Any] | None = None,
                 json_text: str | None = None) -> None:
        """Wrap `hf`. `json_text` is its serialized form when known (from a file), so the hash is the file's."""
        self.hf = hf
        self.chat_template = chat_template if chat_template is not None else default_chat_template()
        self.training = training
        self._json = json_text if json_text is not None else hf.to_str(pretty=True)
        self.hash = sha256_bytes(self._json.encode("utf-8"))

        added = hf.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens: dict[str, int] = {t.content: i for i, t in sorted(added.items()) if t.special}
        missing = [name for name in (pipeline.BOS, pipeline.EOS, pipeline.PAD, pipeline.EOT)
                   if name not in self.special_tokens]
        if missing:
            raise CheckpointError(f"tokenizer lacks the special tokens {missing}; train it with kfoundry's "
                                  "train_tokenizer")
        self.bos_id = self.special_tokens[pipeline.BOS]
        self.eos_id = self.special_tokens[pipeline.EOS]
        self.pad_id = self.special_tokens[pipeline.PAD]
        self.eot_id = self.special_tokens[pipeline.EOT]
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._token_bytes: list[int] | None = None

    # ----------------------------------------------------------------------------------------- encoding

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` after NFC; BOS/EOS only when asked (the post-processor is not used here)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self.hf.encode(nfc(text), add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` over many texts; the Rust side spreads the work over the CPU cores."""
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"encode_batch expects a list of str, found {type(bad).__name__}")
        encodings = self.hf.encode_batch_fast([nfc(t) for t in texts], add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`. Bytes that do not form complete UTF-8 (a sequence cut mid-character) become U+FFFD."""
        ids = [int(i) for i in ids]  # accepts numpy arrays and tensors too
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise CheckpointError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for (0 for special tokens); index by id.

        Bits-per-byte divides a model's loss in nats by ln(2) times these bytes, which makes models with
        different tokenizers comparable. A byte-level token's string has one stand-in character per byte.
        """
        if self._token_bytes is None:
            table = pipeline.byte_decoder()
            out = [0] * self.vocab_size
            specials = set(self.special_tokens.values())
            for token, i in self.hf.get_vocab(with_added_tokens=True).items():
                if i in specials:
                    continue
                if any(ch not in table for ch in token):
                    raise CheckpointError(f"token {i} ({token!r}) is not byte-level; this is not a kfoundry tokenizer")
                out[i] = len(token)
            self._token_bytes = out
        return list(self._token_bytes)

    # --------------------------------------------------------------------------------------------- chat

    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages` ([{"role": ..., "content": ...}, ...]), as text.

        Rendered in a sandboxed Jinja environment with the options `transformers` uses, so the result equals
        `AutoTokenizer.from_pretrained(dir).apply_chat_template(messages, tokenize=False)`.
        """
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        text = compiled_template(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=pipeline.BOS,
            eos_token=pipeline.EOS,
        )
        return nfc(text)

    def encode_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered chat (BOS is part of the template)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    # ------------------------------------------------------------------------------------------ storage

    def meta(self) -> dict[str, Any]:
        """What tokenizer_meta.json records."""
        return {
            "format": META_FORMAT,
            "tokenizer_json_sha256": self.hash,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "eot_id": self.eot_id,
            "special_tokens": self.special_tokens,
            "pipeline": {
                "normalizer": "NFC",
                "pre_tokenizer": "Llama-3 split regex, then ByteLevel(add_prefix_space=False, use_regex=False)",
                "model": "BPE(ignore_merges=True), 256-byte initial alphabet",
                "llama_cpp_pre": pipeline.LLAMA_CPP_PRE,
            },
            "training": self.training,
            "tokenizers_version": tokenizers.__version__,
        }

    def _hf_config(self) -> dict[str, Any]:
        # Enough for transformers to build a fast tokenizer from tokenizer.json and know its special tokens.
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": pipeline.BOS,
            "eos_token": pipeline.EOS,
            "pad_token": pipeline.PAD,
            "clean_up_tokenization_spaces": False,  # any cleanup would break the exact round trip
            "model_input_names": ["input_ids", "attention_mask"],
        }

    def write_files(self, directory: str | Path) -> None:
        """Write the tokenizer files into an existing directory (e.g. inside a caller's own atomic_dir)."""
        d = Path(directory)
        atomic_write_text(d / TOKENIZER_FILE, self._json)
        atomic_write_json(d / META_FILE, self.meta())
        atomic_write_text(d / TEMPLATE_FILE, self.chat_template)
        atomic_write_json(d / HF_CONFIG_FILE, self._hf_config())

    def save(self, path: str | Path) -> None:
        """Write a tokenizer directory atomically; replaces an older tokenizer directory at `path`.

        Refuses to replace a non-empty directory that is not a tokenizer directory, so a wrong `--out`
        never deletes unrelated files.
        """
        check_replaceable(path)
        with atomic_dir(path, overwrite=True) as tmp:
            self.write_files(tmp)

    @classmethod
    def load(cls, path: str | Path) -> KTokenizer:
        """Read a tokenizer directory; the hash in tokenizer_meta.json must match tokenizer.json."""
        d = Path(path)
        if not d.is_dir():
            raise MissingPathError(f"tokenizer directory not found: {d}")
        tok_path = d / TOKENIZER_FILE
        if not tok_path.is_file():
            raise MissingPathError(f"{d} is not a tokenizer directory: {TOKENIZER_FILE} is missing")
        json_text = tok_path.read_bytes().decode("utf-8")
        hf = Tokenizer.from_str(json_text)
        meta = read_json(d / META_FILE) if (d / META_FILE).is_file() else {}
        template_path = d / TEMPLATE_FILE
        template = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
        tok = cls(hf, chat_template=template, training=meta.get("training"), json_text=json_text)
        recorded = meta.get("tokenizer_json_sha256")
        if recorded and recorded != tok.hash:
            raise CheckpointError(f"{tok_path} does not match the sha256 in {META_FILE} "
                                  f"({tok.hash[:12]} != {recorded[:12]}): it was changed after it was saved")
        return tok

    def __repr__(self) -> str:
        return f"KTokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"


def check_replaceable(path: str | Path) -> None:
    """Raise ValueError unless `path` is absent, an empty directory, or an earlier tokenizer directory."""
    p = Path(path)
    if not p.exists():
        return
    if not p.is_dir():
        raise ConfigError(f"refusing to write a tokenizer to {p}: it exists and is not a directory")
    if any(p.iterdir()) and not (p / TOKENIZER_FILE).is_file():
        raise ConfigError(f"refusing to replace {p}: it is not empty and holds no {TOKENIZER_FILE}")

