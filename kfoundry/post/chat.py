"""`kfoundry chat`: talk to a checkpoint in the terminal, with the reply streamed as it is generated.

    > 헌법 제1조는 무엇을 정하고 있나요?
    헌법 제1조: 대한민국은 민주공화국이다.
    > /system 항상 영어로 답하세요.
    > /reset

The whole conversation (system prompt, earlier turns) is rendered with the tokenizer's chat template on every
turn, exactly as in training, and generation stops at the end-of-turn token. When the history outgrows the model's
context, the oldest turns are dropped (the system prompt is kept) and the user is told.

Korean input: lines are NFC-normalized (a macOS terminal may send decomposed jamo), input() goes through readline
when it is available so that editing keys handle wide Hangul characters, and streamed output never prints half
a UTF-8 character: text is written only up to the last complete character decoded so far.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from kfoundry.checkpoint import load_model, load_tokenizer
from kfoundry.errors import DataError
from kfoundry.model.generate import SamplingParams, generate
from kfoundry.post.chat_format import prompt_ids
from kfoundry.text import nfc

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone shows it, /system - clears it)
  /help           this list
  /exit           leave (or Ctrl-D)"""


class StreamDecoder:
    """Turn token ids into text incrementally, holding back bytes that do not yet form a whole character."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence at the end: wait for the next token
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special=True)


class ChatSession:
    """A conversation with one model: history, system prompt, and a `send` that streams the reply."""

    def __init__(self, model, tok, params: SamplingParams | None = None, system: str | None = None) -> None:
        self.model, self.tok = model, tok
        self.params = params or SamplingParams(max_new_tokens=128)
        self.system = nfc(system) if system else None
        self.history: list[dict[str, str]] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        self.system = nfc(text) if text else None

    def messages(self, pending: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += self.history
        if pending is not None:
            msgs.append({"role": "user", "content": pending})
        return msgs

    def _fit_prompt(self, text: str) -> list[int]:
        """Prompt ids for `text` after the history; drops the oldest exchanges until it fits the context."""
        budget = self.model.cfg.max_seq_len - self.params.max_new_tokens
        while True:
            ids = prompt_ids(self.tok, self.messages(text))
            if len(ids) <= budget:
                return ids
            if not self.history:
                raise DataError(f"the message is too long for this model: {len(ids)} tokens with the system "
                                f"prompt, the limit is {budget} (context {self.model.cfg.max_seq_len} minus "
                                f"{self.params.max_new_tokens} for the reply)")
            self.history = self.history[2:]  # one user turn and its reply
            self.dropped_turns += 1

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn, generate the assistant's reply (streamed through `on_text`), remember both."""
        text = nfc(text).strip()
        if not text:
            raise DataError("empty message")
        ids = self._fit_prompt(text)
        stream = StreamDecoder(self.tok)

        def on_token(_row: int, token_id: int) -> None:
            piece = stream.push(token_id)
            if piece and on_text:
                on_text(piece)

        generate(self.model, [ids], self.params, stop_ids={self.tok.eot_id, self.tok.eos_id}, pad_id=self.tok.pad_id,
                 on_token=on_token)
        reply = stream.text()
        tail = reply[stream.emitted:]
        if tail and on_text:  # whatever was held back (a final incomplete character shows as U+FFFD)
            on_text(tail)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.strip()}]
        return reply


def repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, prompt: str = "> ") -> int:
    """The interactive loop: read a line, run a command or send it, stream the reply. Returns an exit code."""
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input(); absent on some platforms)
        except ImportError:
            pass
    stdout.write("kfoundry chat: /help for commands, /exit or Ctrl-D to leave\n")
    stdout.flush()
    while True:
        try:
            line = input(prompt) if stdin is sys.stdin and interactive else _read_line(stdin, stdout, prompt)
        except EOFError:
            stdout.write("\n")
            return 0
        except KeyboardInterrupt:
            stdout.write("\n")
            continue
        except UnicodeDecodeError:
            stdout.write("(the input was not valid UTF-8; check the terminal's encoding)\n")
            continue
        line = nfc(line).strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(session, line, stdout):
                return 0
            continue
        dropped = session.dropped_turns
        try:
            session.send(line, on_text=lambda piece: (stdout.write(piece), stdout.flush()))
        except ValueError as e:
            stdout.write(f"({e})\n")
            continue
        except KeyboardInterrupt:
            stdout.write("\n(interrupted)\n")
            continue
        stdout.write("\n")
        if session.dropped_turns > dropped:
            stdout.write(f"(the oldest {session.dropped_turns - dropped} exchange(s) were dropped to fit "
                         "the model's context)\n")
        stdout.flush()


def _read_line(stdin: TextIO, stdout: TextIO, prompt: str) -> str:
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _command(session: ChatSession, line: str, stdout: TextIO) -> bool:
    """Run a /command; True means leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return True
    if name == "/reset":
        session.reset()
        stdout.write("(conversation cleared)\n")
    elif name == "/system":
        if not arg:
            stdout.write(f"(system prompt: {session.system or 'none'})\n")
        else:
            session.set_system(None if arg == "-" else arg)
            stdout.write("(system prompt cleared)\n" if arg == "-" else "(system prompt set)\n")
    elif name == "/help":
        stdout.write(HELP + "\n")
    else:
        stdout.write(f"(unknown command {name}; /help lists them)\n")
    stdout.flush()
    return False


def chat_main(model_path: str, *, system: str | None, params: SamplingParams, device: str) -> int:
    for stream in (sys.stdin, sys.stdout):  # Korean in and out whatever the locale says
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace" if stream is sys.stdout else "strict")
    model = load_model(model_path, device=device)
    tok = load_tokenizer(model_path)
    return repl(ChatSession(model, tok, params, system))
