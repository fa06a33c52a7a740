"""`hf:NAME[:CONFIG][@SPLIT]`: stream a dataset with Hugging Face `datasets`.

`datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)` never downloads the whole dataset:
records arrive one at a time, so a 1 TB web crawl costs the same to start as a 1 MB file. NAME may be a
hub id ("org/dataset") or a local folder of Parquet/JSON Lines/CSV files, which is how it is tested and
how it works offline (HF_HUB_OFFLINE=1). Each record's `text` field (or `#field=NAME`) is the document;
a string `lang` field is the language tag; the other fields go to `meta`. Ids are `hf:NAME@SPLIT#ROW`
(0-based).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from kfoundry.corpus.document import MISSING, CorpusError, Record, json_safe
from kfoundry.corpus.spec import HubSource

DEFAULT_FIELD = "text"


def _looks_local(name: str) -> bool:
    # "org/dataset" is a hub id; only an explicit path spelling is checked on disk before loading.
    return name.startswith(("/", "./", "../", "~"))


def open_hub(source: HubSource) -> Iterable[dict[str, Any]]:
    """Open the stream now, so a wrong name, config or split fails before any document is read."""
    name = os.path.expanduser(source.name)
    if _looks_local(source.name) and not os.path.exists(name):
        raise CorpusError(f"local dataset folder not found for {source.label!r}: {name!r}")
    import datasets  # imported here: it takes seconds and only hub specs need it

    try:
        return datasets.load_dataset(name, source.config, split=source.split, streaming=True)
    except Exception as e:  # noqa: BLE001 - load_dataset raises many types (ValueError, ConnectionError,
        # DatasetNotFoundError, FileNotFoundError ...); all mean "this spec cannot be opened here".
        first = (str(e).strip().splitlines() or [""])[0]
        offline = " (offline: only local folders and cached datasets work)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise CorpusError(f"cannot open {source.label!r}: {type(e).__name__}: {first}{offline}") from e


def hub_records(source: HubSource, rows: Iterable[dict[str, Any]]) -> Iterator[Record]:
    field = source.field or DEFAULT_FIELD
    for i, row in enumerate(rows):
        lang = row.get("lang")
        yield Record(
            id=f"{source.label}#{i}",
            source=source.label,
            text=row.get(field, MISSING),
            lang=lang if isinstance(lang, str) else None,
            meta={str(k): json_safe(v) for k, v in row.items() if k not in (field, "lang")},
        )
