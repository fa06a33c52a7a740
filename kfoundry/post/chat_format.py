"""Render a conversation to token ids plus the mask of tokens the model should learn.

Supervised fine-tuning teaches the model to write the assistant's turns, not to predict what users say: the loss
is taken only where `mask` is true. The mask is true on exactly the tokens of each assistant message's content and
on the end-of-turn token (`<|eot_id|>`) that closes it; learning to emit that token is what makes generation stop
at the end of a reply. The role headers, the system prompt and the user turns are context only.

How the mask is found, without knowing the template's syntax: for every assistant message i we render

    P_i = template(messages[:i], add_generation_prompt=True)    everything before the reply's first token
    Q_i = template(messages[:i + 1])                            everything up to and including its end of turn

and tokenize them. Because special tokens are tokenization boundaries, tokens(P_i) and tokens(Q_i) are prefixes of
tokens(whole chat); the reply is positions [len(tokens(P_i)), len(tokens(Q_i))). We check the prefix property
instead of assuming it, so a template or tokenizer that breaks it is an error here and never a silently wrong mask.
The ids are exactly `tok.encode_chat(messages)`, which is what `transformers`' `apply_chat_template` gives on an
exported tokenizer (tests/test_post_chat_format.py proves both).
"""

from __future__ import annotations

from collections.abc import Sequence

from kfoundry.errors import CheckpointError, DataError
from kfoundry.text import nfc

ROLES = ("system", "user", "assistant")


def normalize_messages(messages: Sequence[dict]) -> list[dict[str, str]]:
    """Validated copies of `messages` with NFC content: [{"role": ..., "content": ...}, ...].

    Raises ValueError for an empty list, an unknown role, or content that is not a string.
    """
    if not messages:
        raise DataError("a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"message {i} is not an object: {m!r}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"message {i} ({role}) has no string 'content'")
        out.append({"role": role, "content": nfc(content)})
    return out


def render(tok, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the chat and a same-length mask, true exactly on assistant content + its end-of-turn token.

    With `add_generation_prompt=True` the ids end with an open assistant header (a prompt for generation); the
    mask then covers only the assistant turns already in `messages`.
    """
    return render_many(tok, [messages], add_generation_prompt)[0]


def render_many(tok, chats: Sequence[Sequence[dict]], add_generation_prompt: bool = False
                ) -> list[tuple[list[int], list[bool]]]:
    """`render` for many conversations: every text is rendered first, then all are tokenized in one batch.

    Tokenizing dominates the cost (a conversation with k assistant turns needs up to 2k + 1 texts; identical ones,
    like the whole chat and the prefix ending at its last reply, are tokenized once), and the batch call spreads it
    over the CPU cores.
    """
    plans = []
    for messages in chats:
        msgs = normalize_messages(messages)
        whole = render_text(tok, msgs, add_generation_prompt)
        spans = [(i, render_text(tok, msgs[:i], True), render_text(tok, msgs[: i + 1], False))
                 for i, m in enumerate(msgs) if m["role"] == "assistant"]
        plans.append((whole, spans))
    unique = list(dict.fromkeys(t for whole, spans in plans for t in (whole, *(x for s in spans for x in s[1:]))))
    ids_of = dict(zip(unique, tok.encode_batch(unique)))

    out = []
    for whole, spans in plans:
        ids = ids_of[whole]
        mask = [False] * len(ids)
        for i, before, through in spans:
            start, end = _prefix_length(ids, ids_of[before]), _prefix_length(ids, ids_of[through])
            if end <= start or ids[end - 1] != tok.eot_id:
                raise CheckpointError(f"the chat template does not close assistant message {i} with the end-of-turn "
                                      "token; the assistant mask cannot be computed")
            mask[start:end] = [True] * (end - start)
        out.append((ids, mask))
    return out


def _prefix_length(ids: list[int], part: list[int]) -> int:
    """len(part), after checking that `part` (a rendered prefix of the conversation) is a prefix of `ids`."""
    if ids[: len(part)] != part:
        raise CheckpointError("rendering a prefix of the conversation does not tokenize to a prefix of the whole chat "
                              "(the template or tokenizer merges text across turn boundaries); cannot mask assistant "
                              "turns")
    return len(part)


def prompt_ids(tok, messages: Sequence[dict]) -> list[int]:
    """Ids that ask the model for the next assistant turn: the chat so far plus an open assistant header."""
    return encode_chat(tok, normalize_messages(messages), add_generation_prompt=True)


def render_text(tok, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """`tok.render_chat(messages)` (the compiled template is cached there)."""
    return tok.render_chat(messages, add_generation_prompt=add_generation_prompt)


def encode_chat(tok, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """`tok.encode_chat(messages)` through the cached template."""
    return tok.encode(render_text(tok, messages, add_generation_prompt))
