"""Token ids in, text out, a piece at a time: incremental detokenization and stop strings.

Two things make streaming text harder than decoding once at the end:

- A byte-level BPE token can hold part of a UTF-8 character (a Hangul syllable is 3 bytes and may be split
  across tokens; an emoji is 4). Decoding such a prefix yields U+FFFD, so we hold text back until the
  character is complete. To stay O(1) per token we decode only a short window of recent ids (the approach
  of Hugging Face TGI's `decode_token`): the ids since the last emitted piece, with the piece before them as
  context, and emit the difference.
- A stop string may arrive split over several tokens ("</s" then ">"). Text that could be the start of a
  stop string is held back until it either completes the stop (it is then cut off, with everything after)
  or turns out not to be one.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids with `push`; each call returns the text that is now safe to show (possibly "").

    After a stop string is seen, `stopped` is True and further pushes return "". `finish()` returns any
    text still held back (a trailing partial character or partial stop string) when generation ends.
    `text` is everything emitted so far, which is the final completion once `finish()` has been called.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # emitted text
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] is context already turned into text
        self._read = 0
        self._pending = ""  # decoded but held back (could begin a stop string)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        return self._advance()

    def extend(self, token_ids: Sequence[int]) -> str:
        """`push` of several ids at once, for a stream without stop strings: the same text with two decodes in
        all instead of two per id (an engine that answers whole reports all of a choice's ids in one list).

        Same text because byte-level decoding is context-free at a character boundary, and `push` only ever
        emits up to one: the text of one window is the text its pushes would have emitted, concatenated."""
        if self.stop:
            raise ValueError("extend() is for streams without stop strings; push() each id instead")
        if self.stopped or not token_ids:
            return ""
        self.ids.extend(token_ids)
        return self._advance()

    def _advance(self) -> str:
        """Emit the text of the ids not yet turned into text, unless they end inside a character."""
        context = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) <= len(context) or window.endswith(REPLACEMENT):
            return ""  # an incomplete character: wait for the rest of its bytes
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(self._pending + window[len(context):])

    def finish(self) -> str:
        """Flush what is held back at the end of generation."""
        if self.stopped:
            return ""
        tail = self._pending
        if self._read < len(self.ids):  # bytes that never formed a character: show them as U+FFFD
            context = self._decode(self.ids[self._prefix:self._read])
            tail += self._decode(self.ids[self._prefix:])[len(context):]
        self._pending = ""
        self._read = len(self.ids)
        cut = self._cut_at_stop(tail)
        if cut is not None:
            tail = cut
            self.stopped = True
        self.text += tail
        return tail

    def _decode(self, ids: list[int]) -> str:
        # Special tokens (<|begin_of_text|>, headers) are markup, not answer text: they are never shown.
        return self.tok.decode(ids, skip_special=True)

    def _release(self, candidate: str) -> str:
        cut = self._cut_at_stop(candidate)
        if cut is not None:
            self.stopped = True
            self._pending = ""
            self.text += cut
            return cut
        hold = self._partial_stop_len(candidate)
        out, self._pending = candidate[: len(candidate) - hold], candidate[len(candidate) - hold:]
        self.text += out
        return out

    def _cut_at_stop(self, candidate: str) -> str | None:
        """`candidate` up to the earliest stop string (counting text already emitted), or None if none occurs."""
        if not self.stop:
            return None
        # A stop may straddle emitted text and the candidate only if part of it was held back, and held-back
        # text is always in the candidate, so searching the candidate alone is enough.
        hits = [i for i in (candidate.find(s) for s in self.stop) if i >= 0]
        return candidate[: min(hits)] if hits else None

    def _partial_stop_len(self, candidate: str) -> int:
        """Length of the longest suffix of `candidate` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(candidate)), best, -1):
                if candidate.endswith(s[:n]):
                    best = n
                    break
        return best
