"""Bits per byte on held-out text, per language: a score that does not depend on the tokenizer.

    bits per byte = (sum over texts of -log2 p(text)) / (UTF-8 bytes of those texts)

Loss per token cannot compare two models with different tokenizers (a tokenizer with longer tokens makes fewer,
harder predictions); per byte of text it can, because the text is the same. Each text is scored on its own,
conditioned on BOS, with disjoint windows that fill the model's context (scoring.rolling_windows), so every token
is predicted exactly once; bytes are counted on the NFC text the tokenizer actually sees.

The default held-out text is FLORES-200 dev (997 sentences, the same content in Korean and English), so the
Korean and English figures are directly comparable: the gap between them is the model's language gap, not a
difference in what was read. Any `lang=path` text file (one text per line) can be added.

A `Scorer` is anything that turns text into token ids and scores (context, continuation) pairs. kfoundry
checkpoints use the adapter's batched scorer; a Hugging Face directory uses `HFScorer`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kfoundry.errors import ConfigError, MissingPathError
from kfoundry.eval.scoring import rolling_windows, score
from kfoundry.text import nfc

LN2 = math.log(2)
FLORES = {"ko": "flores200/dev/kor_Hang.dev", "en": "flores200/dev/eng_Latn.dev"}


class Scorer(Protocol):
    bos_id: int
    max_len: int

    def encode(self, text: str) -> list[int]:
        """Token ids of the text, without BOS."""

    def score(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Natural-log likelihood (and greediness) of each continuation given its context."""


@dataclass
class KFoundryScorer:
    """Scores with a kfoundry model through the batched, shared-context scorer."""

    model: Any
    tok: Any
    token_budget: int = 8192

    @property
    def bos_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_len(self) -> int:
        return self.model.cfg.max_seq_len

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def score(self, requests):
        return score(self.model, requests, token_budget=self.token_budget)


@dataclass
class HFScorer:
    """Scores with a `transformers` causal LM, one window at a time (the reference, not the fast path)."""

    model: Any
    tokenizer: Any

    @property
    def bos_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(nfc(text), add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def score(self, requests):
        device = next(self.model.parameters()).device
        out = []
        for ctx, cont in requests:
            ids = torch.tensor([list(ctx) + list(cont)[:-1]], device=device)
            logp = torch.log_softmax(self.model(ids).logits[0, -len(cont):].float(), dim=-1)
            target = torch.tensor(cont, device=device)
            out.append((float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return out


def bits_per_byte(texts: Sequence[str], scorer: Scorer) -> dict[str, Any]:
    """Bits per byte over `texts` (each scored from BOS). Empty texts are counted, not scored."""
    windows: list[tuple[list[int], list[int]]] = []
    n_bytes = n_tokens = n_texts = empty = 0
    for text in texts:
        text = nfc(text)
        ids = scorer.encode(text) if text else []
        if not ids:
            empty += 1
            continue
        n_texts += 1
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
        windows.extend(rolling_windows(ids, scorer.bos_id, scorer.max_len))
    if not n_texts:
        return {"bpb": None, "texts": 0, "bytes": 0, "tokens": 0, "skipped_empty": empty}
    nats = -sum(logp for logp, _ in scorer.score(windows))
    return {"bpb": nats / LN2 / n_bytes, "nats_per_token": nats / n_tokens, "texts": n_texts, "bytes": n_bytes,
            "tokens": n_tokens, "bytes_per_token": n_bytes / n_tokens, "skipped_empty": empty}


def read_lines(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a UTF-8 text file (the first `limit` of them)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"held-out text not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:limit] if limit else lines


def shared_data_dir() -> Path:
    return Path(os.environ.get("KFOUNDRY_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def heldout_sets(spec: Sequence[str] | None, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """{lang: {"path", "texts"}} from `lang=path` items, or FLORES-200 dev (ko, en) when spec is empty."""
    if spec:
        pairs = []
        for item in spec:
            lang, sep, path = item.partition("=")
            if not sep or not lang or not path:
                raise ConfigError(f"--bpb expects LANG=PATH, got {item!r}")
            pairs.append((lang, Path(path)))
    else:
        root = shared_data_dir()
        pairs = [(lang, root / rel) for lang, rel in FLORES.items()]
        if not all(p.is_file() for _, p in pairs):
            return {}
    return {lang: {"path": str(p), "texts": read_lines(p, limit)} for lang, p in pairs}


def bpb_by_language(sets: dict[str, dict[str, Any]], scorer: Scorer) -> dict[str, dict[str, Any]]:
    return {lang: {"source": s["path"], **bits_per_byte(s["texts"], scorer)} for lang, s in sets.items()}
