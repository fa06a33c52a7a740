"""Post-training data: conversations for SFT and preference pairs for DPO, read from files into plain Python.

Accepted inputs (all text is NFC-normalized on the way in):

- conversations, OpenAI `messages` JSONL (`.jsonl` or `.jsonl.gz`), one object a line:
      {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                    {"role": "assistant", "content": "..."}, ...]}
  `content` may also be OpenAI's list of parts ([{"type": "text", "text": "..."}]); text parts are joined.
  The role "developer" (OpenAI's newer name for the system prompt) is read as "system".
- question/answer CSV (`.csv`, e.g. ../shared/data/ko/chatbot/ChatbotData.csv): columns named Q/A (also
  question/answer, prompt/response, instruction/output; any case); each row becomes one user/assistant exchange.
- preference pairs JSONL for DPO, one object a line:
      {"prompt": "..." | [messages], "chosen": "..." | [assistant message], "rejected": "..." | [assistant message]}
- the spec `starter`: the small bilingual set shipped in kfoundry/post/data/ (see its README.md).

A bad row never stops a load and is never dropped silently: it is counted in `LoadStats.bad` under a named reason
(`invalid_json`, `bad_message`, `no_assistant_reply`, `empty_field`, ...). A file with no usable row is an error.

`load_split_encode` is how SFT and DPO both turn these rows into training and validation examples.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kfoundry.errors import DataError, MissingPathError
from kfoundry.post.chat_format import ROLES
from kfoundry.text import nfc

STARTER = "starter"
STARTER_CHAT_FILE = "starter_chat.jsonl"
STARTER_PREFS_FILE = "starter_prefs.jsonl"
STARTER_META_FILE = "starter_meta.json"  # how the starter set was built (Python version, counts)

Chat = list[dict[str, str]]
Row = TypeVar("Row")  # a Chat or a Preference
Example = TypeVar("Example")  # what a row encodes to

# Column names a question/answer CSV may use, in order of preference (compared case-insensitively).
QUESTION_COLUMNS = ("q", "question", "prompt", "instruction", "input")
ANSWER_COLUMNS = ("a", "answer", "response", "output", "completion")


@dataclass
class LoadStats:
    """What a load kept and what it refused, by reason."""

    kept: int = 0
    bad: Counter = field(default_factory=Counter)

    def reject(self, reason: str) -> None:
        self.bad[reason] += 1

    def summary(self) -> str:
        refused = ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items())) or "none"
        return f"kept {self.kept}, refused {sum(self.bad.values())} ({refused})"


@dataclass(frozen=True)
class Preference:
    """One DPO example: the conversation so far, and a preferred and a dispreferred assistant reply."""

    prompt: tuple[dict[str, str], ...]
    chosen: str
    rejected: str


class _Bad(Exception):
    """A row that cannot be used; `reason` names why (becomes a LoadStats counter)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ paths


def starter_path(name: str) -> Path:
    """A file of the packaged starter set (kfoundry/post/data/NAME)."""
    return Path(str(importlib.resources.files("kfoundry.post").joinpath("data", name)))


def resolve_path(spec: str | Path, starter_file: str) -> Path:
    if str(spec) == STARTER:
        return starter_path(starter_file)
    p = Path(spec)
    if not p.is_file():
        raise MissingPathError(f"data file not found: {p}")
    return p


def _jsonl_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
        for line in f:
            if line.strip():
                yield line


def _json_objects(path: Path, stats: LoadStats) -> Iterator[dict]:
    try:
        for line in _jsonl_lines(path):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                stats.reject("invalid_json")
                continue
            if not isinstance(obj, dict):
                stats.reject("not_an_object")
                continue
            yield obj
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


# --------------------------------------------------------------------------------------------- messages


def _content_text(content) -> str:
    """A message's content as text: a string, or the text parts of OpenAI's list-of-parts form."""
    if isinstance(content, str):
        return nfc(content)
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _Bad("non_text_content")
            texts.append(part["text"])
        return nfc("".join(texts))
    raise _Bad("bad_message")


def _message(m) -> dict[str, str]:
    if not isinstance(m, dict):
        raise _Bad("bad_message")
    role = m.get("role")
    role = "system" if role == "developer" else role
    if role not in ROLES:
        raise _Bad("unsupported_role")
    return {"role": role, "content": _content_text(m.get("content"))}


def parse_chat(obj: dict) -> Chat:
    """One `{"messages": [...]}` object as a validated conversation (raises _Bad with a reason)."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Bad("no_messages")
    chat = [_message(m) for m in messages]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in chat):
        raise _Bad("no_assistant_reply")
    return chat


def load_chats(spec: str | Path, stats: LoadStats | None = None) -> list[Chat]:
    """Conversations from a messages JSONL file, a question/answer CSV, or `starter`."""
    stats = stats if stats is not None else LoadStats()
    path = resolve_path(spec, STARTER_CHAT_FILE)
    chats = _load_qa_csv(path, stats) if path.suffix.lower() == ".csv" else _parse_jsonl(path, stats, parse_chat)
    if not chats:
        raise DataError(f"{path}: no usable conversation ({stats.summary()})")
    return chats


def _parse_jsonl(path: Path, stats: LoadStats, parse: Callable[[dict], Row]) -> list[Row]:
    """Every object of a JSONL file through `parse`; one it refuses is counted under its reason, not kept."""
    rows = []
    for obj in _json_objects(path, stats):
        try:
            rows.append(parse(obj))
        except _Bad as e:
            stats.reject(e.reason)
            continue
        stats.kept += 1
    return rows


def _pick_column(fields: list[str], candidates: tuple[str, ...]) -> str | None:
    by_lower = {f.strip().lower(): f for f in fields}
    return next((by_lower[c] for c in candidates if c in by_lower), None)


def _load_qa_csv(path: Path, stats: LoadStats) -> list[Chat]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a byte-order mark
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        q_col, a_col = _pick_column(fields, QUESTION_COLUMNS), _pick_column(fields, ANSWER_COLUMNS)
        if q_col is None or a_col is None:
            raise DataError(f"{path}: a question/answer CSV needs columns like Q and A "
                            f"(also question/answer, prompt/response); found {fields}")
        chats = []
        try:
            for row in reader:
                q, a = row.get(q_col), row.get(a_col)
                if q is None or a is None or None in row:  # too few or too many fields on this row
                    stats.reject("malformed_row")
                    continue
                q, a = nfc(q).strip(), nfc(a).strip()
                if not q or not a:
                    stats.reject("empty_field")
                    continue
                chats.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                stats.kept += 1
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason})") from None
    return chats


# ------------------------------------------------------------------------------------------ preferences


def _reply(value) -> str:
    """A chosen/rejected reply: a string, or a list holding one assistant message."""
    if isinstance(value, str):
        text = nfc(value)
    elif isinstance(value, list) and len(value) == 1:
        m = _message(value[0])
        if m["role"] != "assistant":
            raise _Bad("bad_response")
        text = m["content"]
    else:
        raise _Bad("bad_response")
    if not text.strip():
        raise _Bad("empty_response")
    return text


def parse_preference(obj: dict) -> Preference:
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _Bad("empty_prompt")
        messages = [{"role": "user", "content": nfc(prompt)}]
    elif isinstance(prompt, list) and prompt:
        messages = [_message(m) for m in prompt]
    else:
        raise _Bad("bad_prompt")
    if messages[-1]["role"] == "assistant":
        raise _Bad("bad_prompt")  # the prompt must end where the assistant is to answer
    chosen, rejected = _reply(obj.get("chosen")), _reply(obj.get("rejected"))
    if chosen.strip() == rejected.strip():
        raise _Bad("identical_responses")  # no preference to learn
    return Preference(tuple(messages), chosen, rejected)


def load_preferences(spec: str | Path, stats: LoadStats | None = None) -> list[Preference]:
    """Preference pairs from a JSONL file or `starter`."""
    stats = stats if stats is not None else LoadStats()
    path = resolve_path(spec, STARTER_PREFS_FILE)
    prefs = _parse_jsonl(path, stats, parse_preference)
    if not prefs:
        raise DataError(f"{path}: no usable preference pair ({stats.summary()})")
    return prefs


def load_split_encode(data: Sequence[str | Path], val_data: Sequence[str | Path], *,
                      load: Callable[[str | Path, LoadStats], list[Row]],
                      split: Callable[[Sequence[Row], float, int], tuple[list[Row], list[Row]]],
                      encode: Callable[[Any, Sequence[Row], int, LoadStats], list[Example]],
                      tok, seq_len: int, val_fraction: float, seed: int, stage: str, units: tuple[str, str],
                      log: Callable[[str], None]) -> tuple[list[Example], list[Example], LoadStats]:
    """The training and validation examples of a post-training stage, with the counts of every refused row.

    SFT and DPO prepare their data the same way, and only the row type differs (conversations or preference
    pairs), so the steps are passed in:

    1. `load(spec, stats)` reads every spec in `data`;
    2. the validation rows are the files in `val_data` when given, else `split(rows, val_fraction, seed)` holds
       out a seeded share of `data`;
    3. `encode(tok, rows, seq_len, stats)` turns both parts into examples, counting the rows that do not fit.

    One LoadStats collects the whole load, so its summary tells every row's fate. The counts are logged as
    "<stage> data: N training / M validation <units[0]>"; with no training example that fits `seq_len` this is
    an error naming `units[1]` (the unit in the singular).
    """
    stats = LoadStats()
    rows = [r for spec in data for r in load(spec, stats)]
    if val_data:
        train_rows, val_rows = rows, [r for spec in val_data for r in load(spec, stats)]
    else:
        train_rows, val_rows = split(rows, val_fraction, seed)
    train = encode(tok, train_rows, seq_len, stats)
    val = encode(tok, val_rows, seq_len, stats)
    log(f"{stage} data: {len(train)} training / {len(val)} validation {units[0]}; {stats.summary()}")
    if not train:
        raise DataError(f"no {units[1]} fits train.seq_len={seq_len} ({stats.summary()})")
    return train, val, stats
