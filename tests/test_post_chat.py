"""`kfoundry chat`: streaming that never splits a character, multi-turn history, /reset and /system, context
overflow, and a real pseudo-terminal session that sends two turns (one typed as NFD jamo) and reads the answers."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kfoundry import checkpoint as ckpt_io
from kfoundry.model.generate import SamplingParams
from kfoundry.post.chat import ChatSession, StreamDecoder, repl

ROOT = Path(__file__).resolve().parents[1]
HELLO, HELLO_REPLY = "안녕?", "안녕하세요! 😀"
SUM, SUM_REPLY = "2+3?", "5입니다."
CHATS = [
    [{"role": "user", "content": HELLO}, {"role": "assistant", "content": HELLO_REPLY}],
    [{"role": "user", "content": HELLO}, {"role": "assistant", "content": HELLO_REPLY},
     {"role": "user", "content": SUM}, {"role": "assistant", "content": SUM_REPLY}],
    [{"role": "system", "content": "Answer in English."}, {"role": "user", "content": HELLO},
     {"role": "assistant", "content": "Hello! 🎉"}],
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def chat_model(tiny_checkpoint, tmp_path_factory):
    """A tiny model fine-tuned until it answers the two turns above word for word (greedy decoding)."""
    from kfoundry.post.sft import sft, sft_train_config

    d = tmp_path_factory.mktemp("chat")
    texts = [m["content"] for c in CHATS for m in c] + ["The quick brown fox.", "대한민국은 민주공화국이다."]
    base, _ = tiny_checkpoint(texts * 40, 350, max_seq_len=96)  # conftest: a random test-micro-sized model
    data = d / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in CHATS), encoding="utf-8")
    tc = sft_train_config("test-micro", ["train.lr=1e-2", "train.warmup_steps=5", "train.max_steps=60",
                                         "train.seq_len=96", "train.eval_every=1000", "train.ckpt_every=1000"])
    summary = sft(base, [data], d / "sft", tc, val_fraction=0.0, progress=False, log=lambda m: None)
    assert summary["final_loss"] < 0.05
    return Path(summary["checkpoint"])


def greedy(n: int = 24) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def test_stream_decoder_never_splits_a_character(chat_model):
    tok = ckpt_io.load_tokenizer(chat_model)
    text = "뷁 🌏 한글 😀 Korean 12,345원 \u1112\u1161\u11ab"  # 뷁 and 🌏 are unseen: byte tokens
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) and not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") >= 4  # 뷁 and 🌏 arrive as byte tokens, held back until whole


def test_session_multi_turn_streaming_reset_and_system(chat_model):
    model, tok = ckpt_io.load_model(chat_model), ckpt_io.load_tokenizer(chat_model)
    session = ChatSession(model, tok, greedy())
    pieces: list[str] = []
    assert session.send(HELLO, on_text=pieces.append) == HELLO_REPLY
    assert len(pieces) > 1 and "".join(pieces) == HELLO_REPLY  # streamed, not printed at the end
    assert session.send(SUM) == SUM_REPLY  # needs the first exchange in its context
    assert session.messages() == CHATS[1]
    session.reset()
    assert session.history == [] and session.messages() == []
    session.set_system("Answer in English.")
    assert session.send(HELLO) == "Hello! 🎉"
    assert session.messages()[0] == {"role": "system", "content": "Answer in English."}
    with pytest.raises(ValueError, match="empty"):
        session.send("   ")


def test_old_turns_are_dropped_when_the_context_is_full(chat_model):
    model, tok = ckpt_io.load_model(chat_model), ckpt_io.load_tokenizer(chat_model)
    session = ChatSession(model, tok, greedy(40))  # 96-token context, 40 kept for the reply
    for _ in range(4):
        session.send(HELLO)
    assert session.dropped_turns > 0
    assert len(tok.encode_chat(session.messages())) <= 96
    with pytest.raises(ValueError, match="too long for this model"):
        session.send("아주 긴 질문 " * 40)


def test_repl_commands_without_a_terminal(chat_model):
    model, tok = ckpt_io.load_model(chat_model), ckpt_io.load_tokenizer(chat_model)
    session = ChatSession(model, tok, greedy())
    stdin = io.StringIO(f"{HELLO}\n/system\n/system Answer in English.\n/reset\n{HELLO}\n/nope\n/help\n/exit\n")
    stdout = io.StringIO()
    assert repl(session, stdin, stdout) == 0
    out = stdout.getvalue()
    assert HELLO_REPLY in out and "Hello! 🎉" in out
    for line in ("(system prompt: none)", "(system prompt set)", "(conversation cleared)", "unknown command /nope",
                 "/reset"):
        assert line in out


# ------------------------------------------------------------------------------------------- pseudo-terminal


def read_until(fd: int, marker: str, timeout: float = 90.0) -> str:
    """Read the terminal until `marker` appears; fail with what was seen if it does not."""
    buf = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in buf:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout}s; the terminal showed {buf.decode(errors='replace')!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", errors="replace")


def test_chat_in_a_pseudo_terminal(chat_model):
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "kfoundry", "chat", "--model", str(chat_model),
                             "--temperature", "0", "--max-new-tokens", "24"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, start_new_session=True)
    os.close(slave)
    try:
        read_until(master, "> ")
        # turn 1, typed as decomposed jamo (what some macOS input paths send): NFC makes it the trained question
        os.write(master, ("\u110b\u1161\u11ab\u1102\u1167\u11bc?" + "\r").encode())
        first = read_until(master, "\n> ")
        assert HELLO_REPLY in first, first
        # turn 2 only makes sense after turn 1
        os.write(master, (SUM + "\r").encode())
        second = read_until(master, "\n> ")
        assert SUM_REPLY in second, second
        os.write(master, b"/reset\r")
        assert "(conversation cleared)" in read_until(master, "\n> ")
        os.write(master, b"/exit\r")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
