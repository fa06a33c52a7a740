"""`LeanFilter`: datatrove's filter loop without its per-document statistics.

datatrove's `BaseFilter.run` times every document and updates three or four statistics for each (a timing
context, `total`, `forwarded`/`dropped`, the document-length statistics): on short web documents that is more
work than our cheap steps themselves, and the curation filter stage runs six such steps on every document
(about 9% of the whole `data prepare --recipe ko-web` run on the NSMC reviews, measured with py-spy). The
counts that matter are kept: every step is wrapped in `Accounted`, which counts each document in, kept and
removed by reason; datatrove's own stats file gets the per-task totals (`total`, `forwarded`, `dropped`,
`dropped_<reason>`) once at the end of the task instead of per document.

Which documents are kept, in which order, and what the exclusion writer receives are exactly as in
`BaseFilter.run` with `batch_size=1`.
"""

from __future__ import annotations

import contextlib
from collections import Counter

from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.utils.typeshelper import StatHints


class LeanFilter(BaseFilter):
    """A datatrove filter whose `run` keeps datatrove's semantics without per-document statistics."""

    def run(self, data, rank: int = 0, world_size: int = 1):
        if self.batch_size != 1:  # a batched filter keeps datatrove's own loop
            yield from super().run(data, rank, world_size)
            return
        forwarded = 0
        dropped: Counter = Counter()
        with self.exclusion_writer if self.exclusion_writer else contextlib.nullcontext() as writer:
            try:
                for doc in data or ():
                    keep, reason = get_filter_result(self.filter(doc))
                    if keep:
                        forwarded += 1
                        yield doc
                        continue
                    dropped[reason] += 1
                    if writer:
                        if reason:
                            doc.metadata["filter_reason"] = reason
                        writer.write(doc, rank)
            finally:
                n_dropped = sum(dropped.values())
                for label, value in ((StatHints.total, forwarded + n_dropped), (StatHints.forwarded, forwarded),
                                     (StatHints.dropped, n_dropped),
                                     *((f"dropped_{r}", v) for r, v in dropped.items() if r)):
                    if value:
                        self.stat_update(label, value=value)
