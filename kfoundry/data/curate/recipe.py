"""Curation recipes: YAML files that say which steps run and with which thresholds.

A recipe is looked up by name in `kfoundry/data/curate/recipes/` (`ko-web`, `ko-en-mix`, `clean`) or read
from a path. `extends: NAME` starts from another recipe and overrides keys (mappings merge, lists and
values replace), so a variant lists only what differs. Unknown keys are errors, so a typo cannot silently
fall back to a default. Sections (each optional; `quality: null` turns quality filtering off):

    normalize:       min_chars, max_chars, max_junk_fraction, fix_mojibake
    language:        keep (routes), ko_min_hangul, mixed_min_hangul, en_min_latin
    quality:         kiwi_model, estimate_short_docs, thresholds: {ko|en: {gopher_quality|fineweb_quality|gopher_repetition: {args}}}
    decontaminate:   enabled, n_grams, min_item_words, sets (folders; "shared:eval/kobest" = the shared data)
    dedup:           exact, minhash, n_grams, num_buckets, hashes_per_bucket, char_n_grams, char_max_chars
    pii:             enabled, types
    output:          val_fraction, vocab_size (for the token shards)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kfoundry.data.recipe_names import RECIPE_DIR, builtin_recipes
from kfoundry.data.curate.language import LanguageConfig
from kfoundry.data.curate.normalize import NormalizeConfig
from kfoundry.data.curate.pii import PII_TYPES
from kfoundry.data.curate.quality import check_thresholds
from kfoundry.data.curate.words import KIWI_MODELS
from kfoundry.errors import ConfigError

SHARED_PREFIX = "shared:"


@dataclass
class QualityConfig:
    kiwi_model: str = "knlm"
    # Take a document as too short for Gopher's word minimum from an estimate of its Kiwi word count instead
    # of tokenizing it (kfoundry.data.curate.quality, step 2c): much faster on short texts, and not exact.
    estimate_short_docs: bool = False
    thresholds: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kiwi_model not in KIWI_MODELS:
            raise ConfigError(f"quality.kiwi_model must be one of {', '.join(KIWI_MODELS)}, got {self.kiwi_model!r}")
        unknown = sorted(set(self.thresholds) - {"ko", "en"})
        if unknown:
            raise ConfigError(f"quality.thresholds: languages must be 'ko' or 'en', got {unknown}")
        check_thresholds(self.thresholds)


@dataclass
class DecontConfig:
    enabled: bool = True
    n_grams: int = 13
    min_item_words: int = 8
    sets: list = field(default_factory=lambda: [SHARED_PREFIX + "eval/kobest"])

    def __post_init__(self) -> None:
        if not 1 <= self.min_item_words <= self.n_grams:
            raise ConfigError("decontaminate: need 1 <= min_item_words <= n_grams")


@dataclass
class DedupConfig:
    exact: bool = True
    minhash: bool = True
    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    # Short documents (at most char_max_chars characters once simplified) get character n-gram shingles
    # instead of word n-grams; char_n_grams: 0 turns that off (see stages.ShingleMinhashSignature).
    char_n_grams: int = 4
    char_max_chars: int = 500

    def __post_init__(self) -> None:
        if min(self.n_grams, self.num_buckets, self.hashes_per_bucket) < 1:
            raise ConfigError("dedup: n_grams, num_buckets and hashes_per_bucket must be positive")
        if self.char_n_grams < 0 or self.char_max_chars < 0:
            raise ConfigError("dedup: char_n_grams and char_max_chars must be >= 0")


@dataclass
class PiiConfig:
    enabled: bool = True
    types: list = field(default_factory=lambda: list(PII_TYPES))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.types) - set(PII_TYPES))
        if unknown:
            raise ConfigError(f"pii.types: unknown {unknown}; known: {', '.join(PII_TYPES)}")


@dataclass
class OutputConfig:
    val_fraction: float = 0.05
    vocab_size: int = 4096


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    quality: QualityConfig | None = field(default_factory=QualityConfig)
    decontaminate: DecontConfig = field(default_factory=DecontConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"normalize": NormalizeConfig, "language": LanguageConfig, "quality": QualityConfig,
             "decontaminate": DecontConfig, "dedup": DedupConfig, "pii": PiiConfig, "output": OutputConfig}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw(name_or_path: str | Path, seen: tuple = ()) -> dict:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown recipe {str(name_or_path)!r}; built-in: {', '.join(builtin_recipes())} "
                              "(or give a path to a .yaml file)")
    if str(path) in seen:
        raise ConfigError(f"recipe {path} extends itself")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    data.setdefault("name", path.stem)
    parent = data.pop("extends", None)
    if parent:
        base = _raw(parent, (*seen, str(path)))
        base.pop("name", None)
        base.pop("description", None)
        data = _deep_merge(base, data)
    return data


def recipe_from_dict(data: dict) -> Recipe:
    unknown = sorted(set(data) - set(_SECTIONS) - {"name", "description"})
    if unknown:
        raise ConfigError(f"recipe: unknown key(s) {unknown}; known: name, description, {', '.join(_SECTIONS)}")
    kwargs: dict[str, Any] = {"name": str(data.get("name", "custom")),
                              "description": str(data.get("description", "")).strip()}
    for key, cls in _SECTIONS.items():
        if key not in data:
            continue
        section = data[key]
        if section is None:
            if key != "quality":
                raise ConfigError(f"recipe: only 'quality' can be null (turned off), not {key!r}")
            kwargs[key] = None
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"recipe: {key!r} must be a mapping")
        allowed = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(section) - allowed)
        if bad:
            raise ConfigError(f"recipe: {key} has unknown key(s) {bad}; known: {sorted(allowed)}")
        kwargs[key] = cls(**section)
    return Recipe(**kwargs)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (`ko-web`, ...) or a YAML file by path; raises ValueError on mistakes."""
    return recipe_from_dict(_raw(name_or_path))


def shared_data_dir() -> Path:
    """`$KFOUNDRY_SHARED_DATA`, else `../shared/data` beside the checkout (where tests and CI find it)."""
    env = os.environ.get("KFOUNDRY_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared" / "data"


def resolve_set(entry: str) -> Path:
    """A decontamination set as a path; "shared:REL" is REL inside the shared data folder."""
    if entry.startswith(SHARED_PREFIX):
        return shared_data_dir() / entry[len(SHARED_PREFIX):]
    return Path(entry).expanduser()
