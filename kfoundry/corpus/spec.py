"""Parse a corpus SPEC string into the sources it names. Syntax only: the disk is looked at just to take
an existing path literally (see below); whether files exist is checked when a source is opened.

Grammar (docs/corpus.md has examples):

    SPEC    := SOURCE | PART ("," PART)+          a mix needs two or more parts
    PART    := SOURCE ":" WEIGHT                  every part of a mix carries a positive weight
    SOURCE  := "starter"
             | "hf:" NAME [":" CONFIG] ["@" SPLIT] [OPTION]
             | PATH [OPTION]                      a file or a folder
    OPTION  := ("#" KEY "=" VALUE)+              per-source options, each starting with "#":
               "#field=NAME" | "#column=NAME"      which field/column holds the text (same option)
               "#truncated=keep"                   use what a damaged compressed file held before the
                                                   damage (default: a damaged .jsonl.gz/.parquet is an error)

Why these separators: "," and ":WEIGHT" belong to mixes, so per-source options use "#", which cannot be
confused with a weight or with the ":CONFIG" of a hub dataset. The weight is always the text after the
*last* colon of a mix part, so "hf:NAME:CONFIG:0.5" is unambiguous. A path that really exists is taken
literally, so files whose names hold "," "#" or ":" still work ("starter" and "hf:" are keywords,
checked first; spell a folder named "starter" as "./starter").
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from kfoundry.corpus.document import CorpusError

SPEC_HELP = (
    "a SPEC is 'starter', a file or folder (.txt .jsonl .jsonl.gz .parquet .csv), "
    "'hf:NAME[:CONFIG][@SPLIT]', or a weighted mix like 'a.jsonl:0.7,b.txt:0.3'"
)
OPTION_KEYS = ("field", "column", "truncated")  # "field" and "column" are synonyms: JSON vs tables
TRUNCATED_KEEP = "keep"
DEFAULT_SPLIT = "train"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]+:")  # "hub:x", "s3://x": a kind of spec we do not know


@dataclass(frozen=True)
class StarterSource:
    label: str = "starter"


@dataclass(frozen=True)
class PathSource:
    path: str  # as the user wrote it (ids and sources keep this spelling, so they are stable)
    field: str | None = None
    keep_truncated: bool = False  # "#truncated=keep": a damaged compressed file yields what it held

    @property
    def label(self) -> str:
        return self.path


@dataclass(frozen=True)
class HubSource:
    name: str
    config: str | None = None
    split: str = DEFAULT_SPLIT
    field: str | None = None

    @property
    def label(self) -> str:
        config = f":{self.config}" if self.config else ""
        return f"hf:{self.name}{config}@{self.split}"


Source = StarterSource | PathSource | HubSource


@dataclass(frozen=True)
class Part:
    source: Source
    weight: float = 1.0


def parse_spec(spec: str) -> list[Part]:
    """Split SPEC into weighted parts (one part of weight 1.0 when it is not a mix)."""
    if not isinstance(spec, str) or not spec.strip():
        raise CorpusError(f"empty corpus spec; {SPEC_HELP}")
    spec = spec.strip()
    if "," not in spec or (os.path.exists(spec) and not spec.startswith("hf:")):
        return [Part(parse_source(spec))]
    parts = [_parse_part(p.strip(), spec) for p in spec.split(",")]
    labels = [p.source.label for p in parts]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise CorpusError(f"corpus mix {spec!r} lists {repeated[0]!r} twice; give it one part with the summed weight")
    return parts


def _parse_part(part: str, spec: str) -> Part:
    source, sep, weight_text = part.rpartition(":")
    weight = _parse_weight(weight_text) if sep else None
    if not part or weight is None or not source:
        raise CorpusError(f"corpus mix {spec!r}: part {part!r} needs a positive weight, e.g. 'a.jsonl:0.7,b.txt:0.3'")
    return Part(parse_source(source), weight)


def _parse_weight(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


def parse_source(text: str) -> Source:
    """One source of a spec (no weight)."""
    # Keywords first: a folder that happens to be called "starter" is spelled "./starter".
    if text == "starter":
        return StarterSource()
    if text.startswith("hf:"):
        body, options = _split_options(text)
        if "truncated" in options:
            raise CorpusError(f"'#truncated=' applies to local files, not to a hub dataset: {text!r}")
        return _parse_hub(body[3:], options.get("field"), text)
    if os.path.exists(text):
        return PathSource(text)
    body, options = _split_options(text)
    option_field = options.get("field")
    if body == "starter":
        raise CorpusError(f"the starter corpus takes no options: {text!r}")
    head, colon, tail = body.rpartition(":")
    if colon and head and _parse_weight(tail) is not None:
        raise CorpusError(f"corpus spec {text!r}: a weight needs a mix of two or more sources; {SPEC_HELP}")
    if _SCHEME.match(body):  # two or more letters, so a Windows drive "C:" is still a path
        kind = body.split(":", 1)[0] + ":"
        raise CorpusError(f"unknown corpus spec kind {kind!r} in {text!r}; {SPEC_HELP}")
    return PathSource(body, option_field, keep_truncated=options.get("truncated") == TRUNCATED_KEEP)


def _split_options(text: str) -> tuple[str, dict[str, str]]:
    """`path#field=x#truncated=keep` -> ("path", {"field": "x", "truncated": "keep"}); "column" is "field"."""
    body, *items = text.split("#")
    options: dict[str, str] = {}
    for option in items:
        key, eq, value = option.partition("=")
        if key not in OPTION_KEYS or not eq or not value:
            raise CorpusError(f"bad option {'#' + option!r} in corpus spec {text!r}; use '#field=NAME' "
                              "(or '#column=NAME') and/or '#truncated=keep'")
        if key == "truncated" and value != TRUNCATED_KEEP:
            raise CorpusError(f"bad option {'#' + option!r} in corpus spec {text!r}; the only value is "
                              f"'#truncated={TRUNCATED_KEEP}'")
        key = "field" if key == "column" else key
        if key in options:
            raise CorpusError(f"corpus spec {text!r} gives '#{key}=' twice")
        options[key] = value
    return body, options


def _parse_hub(rest: str, option_field: str | None, text: str) -> HubSource:
    name_config, at, split = rest.rpartition("@")
    if not at:
        name_config, split = rest, DEFAULT_SPLIT
    name, _, config = name_config.partition(":")
    if not name or not split or (":" in name_config and not config):
        raise CorpusError(f"bad hub spec {text!r}; expected 'hf:NAME[:CONFIG][@SPLIT]', e.g. 'hf:nsmc@train'")
    return HubSource(name=name, config=config or None, split=split, field=option_field)
