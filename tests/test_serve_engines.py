"""Engines behind one front: our torch engine's prepared decode step; llama.cpp's `llama-server` serving
chat, streams and errors through kfoundry's API (with the official `openai` client), which is the forwarding
path vLLM shares; and the vLLM command line and request dialect (vLLM itself needs a GPU).

The llama.cpp tests run the real `llama-server` binary built by scripts/build_llama_server.sh (found next to
the venv's python, on PATH, or at $KFOUNDRY_LLAMA_SERVER). Without it they skip with the build command;
in CI (`KFOUNDRY_REQUIRE_SHARED=1`, set by .ci/run) its absence is a failure.
"""

from __future__ import annotations

import threading
import unicodedata

import httpx
import openai
import pytest
import torch

from conftest import TINY_TEXTS
from engine_apps import llama_server_or_skip

from kfoundry.checkpoint import load_model, load_tokenizer
from kfoundry.export.gguf import export_gguf
from kfoundry.model.generate import SamplingParams
from kfoundry.model.quantize import quantize_int8
from kfoundry.serve.app import ServeConfig, create_app
from kfoundry.serve.batch import GenericSlots, PreparedSlots
from kfoundry.errors import DependencyError
from kfoundry.export.hf import export_hf
from kfoundry.serve.engines.llama_cpp import LlamaCppEngine
from kfoundry.serve.engines.vllm import INSTALL_HINT, VllmServer, VllmUpstream, find_vllm
from kfoundry.serve.scheduler import Scheduler, Ticket
from kfoundry.serve.server import BackgroundServer

MODEL = "kf-engine"


@pytest.fixture(scope="module")
def engine_ckpt(tiny_checkpoint):
    """A random test-micro-shaped checkpoint (context 128) with weights 5x the usual init scale: its logits spread
    wide, so most greedy steps have a top-two margin far above float rounding and the engines can be compared
    token for token. Random weights serve the same as trained ones here; they only need to be the same."""
    return tiny_checkpoint(TINY_TEXTS, 512, max_seq_len=128, init_std=0.1)[0]


# ------------------------------------------------------------------------- the torch engine's prepared step


@pytest.mark.parametrize("int8", [False, True])
def test_prepared_slots_match_the_general_forward(engine_ckpt, int8):
    """The prepared batched step gives every row the logits of the model's own forward at that row's position,
    for rows of different lengths, after a finished row's slot is reused (`move`), float32 and int8 alike."""
    model = load_model(engine_ckpt)
    if int8:
        quantize_int8(model)
    V = model.cfg.vocab_size
    fast, ref = PreparedSlots(model, 4, 128), GenericSlots(model, 4, 128)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (9, 1, 23)]
    with torch.inference_mode():
        for slot, s in enumerate(seqs):
            torch.testing.assert_close(fast.prefill(slot, s), ref.prefill(slot, s))
        for step in range(6):
            if step == 2:  # row 0 leaves; row 2 moves into its slot, as the scheduler does
                fast.move(2, 0, len(seqs[2]))
                ref.move(2, 0, len(seqs[2]))
                seqs = [seqs[2], seqs[1]]
            tokens = torch.randint(0, V, (len(seqs),), generator=g)
            got, want = fast.step(tokens), ref.step(tokens)  # each slot at its own length
            assert fast.lengths[:len(seqs)] == ref.cache.lengths[:len(seqs)] == [len(s) + 1 for s in seqs]
            for i, s in enumerate(seqs):
                s.append(int(tokens[i]))
            # int8 rows go through a bfloat16 kernel in both paths, in a different order: wider tolerance.
            tol = 2e-2 if int8 else 1e-4
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert isinstance(Scheduler(model, max_batch=2).slots, PreparedSlots)  # what the server really runs


# ----------------------------------------------------------------------------------------- llama.cpp engine


@pytest.fixture(scope="module")
def llama_server_binary():
    return llama_server_or_skip()


@pytest.fixture(scope="module")
def gguf(engine_ckpt, tmp_path_factory):
    return export_gguf(engine_ckpt, tmp_path_factory.mktemp("engine") / "model-f32.gguf", out_type="f32").path


@pytest.fixture(scope="module")
def llama_front(engine_ckpt, gguf, llama_server_binary):
    """Our front over llama-server (4 slots, queue of 2), with an API key."""
    ckpt = engine_ckpt
    engine = LlamaCppEngine(gguf, max_len=128, max_batch=4, max_queue=2, threads=1).start()
    cfg = ServeConfig(model_name=MODEL, api_key="sekret", default_max_tokens=16)
    with BackgroundServer(create_app(engine, load_tokenizer(ckpt), cfg)) as srv:
        yield srv, engine
    engine.stop()


def client(srv, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=kw.pop("api_key", "sekret"), max_retries=0, timeout=60,
                         **kw)


def run_tickets(engine, prompts: list[list[int]], params: SamplingParams, stop_ids=frozenset(),
                stream: bool = True, reports: list | None = None) -> list[list[int]]:
    """Submit one ticket per prompt to an engine (torch scheduler or llama.cpp) and wait for all token ids.
    `reports` (if given) collects every event list the engine reported, as it reported them."""
    out: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def listener(i):
        def on_events(events):
            if reports is not None:
                reports.append(list(events))
            for _, token, reason in events:
                if token is not None:
                    out[i].append(token)
                if reason is not None:
                    assert reason in ("stop", "length"), reason
                    done[i].set()
        return on_events

    engine.submit([Ticket(p, params, listener(i), stop_ids=stop_ids, stream=stream) for i, p in enumerate(prompts)])
    for e in done:
        assert e.wait(60)
    return out


def greedy_margins(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """Top-1 minus top-2 logit at every generated position of `tokens` after `prompt` (our forward)."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def test_cancel_hooks_fire_at_every_cancel_and_at_once_when_late():
    """A forwarding engine waits on an upstream answer without polling: the ticket's cancel hooks wake it, at
    every cancel (the whole ticket or one choice), and at once for a hook added after a cancel."""
    t = Ticket([1, 2], SamplingParams(max_new_tokens=1), lambda events: None, n=2)
    calls: list[str] = []
    t.on_cancel(lambda: calls.append("a"))
    assert calls == []
    t.cancel(1)
    assert calls == ["a"] and t.wants(0) and not t.wants(1)
    t.on_cancel(lambda: calls.append("b"))  # a choice is cancelled already
    assert calls == ["a", "b"]
    t.cancel()
    assert calls == ["a", "b", "a", "b"] and not t.wants(0)


def test_greedy_tokens_match_the_torch_engine(engine_ckpt, llama_front, mixed_texts):
    """llama.cpp and our torch engine choose the same greedy tokens on the same checkpoint, up to the first step
    whose top-two logit margin is within F32 rounding of a tie (measured, not assumed)."""
    _, engine = llama_front
    model, tok = load_model(engine_ckpt), load_tokenizer(engine_ckpt)
    prompts = [tok.encode(t, bos=True) for t in mixed_texts]
    params = SamplingParams(max_new_tokens=32)
    sched = Scheduler(model, max_batch=4).start()
    try:
        ours = run_tickets(sched, prompts, params)
    finally:
        sched.stop()
    theirs = run_tickets(engine, prompts, params)  # all at once: several llama.cpp slots in one batch
    compared = 0
    for prompt, a, b in zip(prompts, ours, theirs):
        assert len(a) == len(b) == 32
        margins = greedy_margins(model, prompt, a)
        safe = next((i for i, m in enumerate(margins) if m < 1e-3), len(a))  # F32 logits agree to ~1e-5
        assert b[: safe + 1] == a[: safe + 1], f"{tok.decode(prompt)!r}: differs before a margin of 1e-3"
        compared += safe
    assert compared >= 3 * 32, f"only {compared} tokens had a margin wide enough to compare"


def test_openai_client_chat_stream_and_completions(engine_ckpt, llama_front):
    srv, engine = llama_front
    tok = load_tokenizer(engine_ckpt)
    c = client(srv)
    assert [m.id for m in c.models.list().data] == [MODEL]
    health = httpx.get(srv.url + "/health").json()
    assert health["status"] == "ok" and health["engine"] == "llama.cpp" and health["max_batch"] == 4

    messages = [{"role": "system", "content": "당신은 친절한 도우미입니다."},
                {"role": "user", "content": "안녕하세요! 2026년 계획은? 😀"}]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and 0 < r.usage.completion_tokens <= 24
    # The answer is llama.cpp's tokens decoded by our tokenizer: the same text the engine's tokens spell.
    [tokens] = run_tickets(engine, [ids], SamplingParams(max_new_tokens=24),
                           stop_ids=frozenset({tok.eos_id, tok.eot_id}))
    assert r.choices[0].message.content == tok.decode(tokens, skip_special=True)

    stream = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 3  # it really streamed
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # Completions: NFD input is normalised by the front; n choices; stop strings cut the text.
    prompt = "대한민국 헌법 제1조 😀"
    a = c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, n=2)
    b = c.completions.create(model=MODEL, prompt=unicodedata.normalize("NFD", prompt), max_tokens=20, temperature=0)
    assert a.choices[0].text == a.choices[1].text == b.choices[0].text
    full = a.choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip()
    s = c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert s.choices[0].text == full[: full.index(stop)] and s.choices[0].finish_reason == "stop"
    # Seeded sampling is reproducible through llama.cpp too.
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


def test_errors_keep_our_shapes(llama_front):
    srv, _ = llama_front
    with pytest.raises(openai.AuthenticationError):
        client(srv, api_key="wrong").models.list()
    c = client(srv)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="안녕 " * 200, max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="other", prompt="hi", max_tokens=4)
    # Queue bound (4 slots + 2 waiting): a burst of 8 single-choice prompts in one request is refused whole.
    with pytest.raises(openai.RateLimitError):
        c.completions.create(model=MODEL, prompt=["x"] * 7, max_tokens=4)


def test_engine_failure_is_a_500_and_health_503(engine_ckpt, gguf, llama_server_binary):
    """llama-server dying mid-service: requests get our 500 error shape and /health says 503."""
    engine = LlamaCppEngine(gguf, max_len=128, max_batch=2, max_queue=2, threads=1).start()
    cfg = ServeConfig(model_name=MODEL, default_max_tokens=8)
    with BackgroundServer(create_app(engine, load_tokenizer(engine_ckpt), cfg)) as srv:
        c = client(srv)
        assert c.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=0).choices[0].text is not None
        engine.server.proc.kill()
        engine.server.proc.wait(10)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL, prompt="hi", max_tokens=4)
        assert e.value.body["type"] == "server_error"
        assert httpx.get(srv.url + "/health").status_code == 503
    engine.stop()


def test_cli_llama_cpp_errors_are_one_line(engine_ckpt, tmp_path, capsys):
    """`kfoundry serve --engine llama.cpp` without a binary, or with a GGUF that is not there, says so in one line
    before exporting or binding anything."""
    from kfoundry.cli import main

    rc = main(["serve", "--model", str(engine_ckpt), "--engine", "llama.cpp", "--llama-server", str(tmp_path / "no")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "llama-server binary not found" in err and len(err.splitlines()) == 1
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    rc = main(["serve", "--model", str(engine_ckpt), "--engine", "llama.cpp", "--llama-server", str(fake),
               "--gguf", str(tmp_path / "missing.gguf")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "GGUF file not found" in err and len(err.splitlines()) == 1


def test_non_streaming_requests_are_one_upstream_answer(engine_ckpt, llama_front, mixed_texts):
    """A request the client reads whole is forwarded as one non-streamed llama-server request: all its tokens
    arrive in one report (no per-token chunk, parse or thread hop), and they are the streamed tokens."""
    _, engine = llama_front
    tok = load_tokenizer(engine_ckpt)
    params = SamplingParams(max_new_tokens=24)
    for text in mixed_texts[:3]:  # one at a time: the same batch of one in both modes
        prompt = [tok.encode(text, bos=True)]
        streamed_reports, whole_reports = [], []
        streamed = run_tickets(engine, prompt, params, reports=streamed_reports)
        whole = run_tickets(engine, prompt, params, stream=False, reports=whole_reports)
        assert whole == streamed and len(whole[0]) == 24
        with_tokens = lambda reports: [r for r in reports if any(t is not None for _, t, _ in r)]  # noqa: E731
        assert len(with_tokens(whole_reports)) == 1 and len(with_tokens(streamed_reports)) > 1
        assert whole_reports[-1][-1] == (0, whole[0][-1], "length")


# ------------------------------------------------------------------------------------- vLLM (no GPU here)


def test_vllm_command_line(engine_ckpt, tmp_path, monkeypatch):
    """The vLLM server command `--engine vllm` would start, built from a real Hugging Face export (not run)."""
    hf = export_hf(engine_ckpt, tmp_path / "hf")
    fake = tmp_path / "venv-vllm" / "vllm"  # a `vllm` of another environment; never executed here
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    server = VllmServer(hf, max_num_seqs=16, max_model_len=128, tensor_parallel=2, dtype="float32", vllm=fake)
    server.port = 8123
    assert server.command() == [
        str(fake), "serve", str(hf), "--served-model-name", "kfoundry", "--host", "127.0.0.1", "--port", "8123",
        "--max-num-seqs", "16", "--max-model-len", "128", "--tensor-parallel-size", "2", "--dtype", "float32"]
    one_gpu = VllmServer(hf, max_num_seqs=4, max_model_len=128, vllm=fake)
    assert "--tensor-parallel-size" not in one_gpu.command() and "--dtype" not in one_gpu.command()
    monkeypatch.setenv("KFOUNDRY_VLLM", str(fake))
    assert find_vllm() == [str(fake), "serve"]
    monkeypatch.setenv("KFOUNDRY_VLLM", str(tmp_path / "nothing"))
    with pytest.raises(DependencyError, match="not found"):
        find_vllm()
    with pytest.raises(FileNotFoundError, match="config.json"):
        VllmServer(tmp_path, max_num_seqs=4, max_model_len=128, vllm=fake)


def test_vllm_missing_is_one_line(engine_ckpt, monkeypatch, capsys):
    """Without vLLM, `kfoundry serve --engine vllm` says how to install it, in one line, before exporting."""
    import importlib.util

    from kfoundry.cli import main

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    monkeypatch.delenv("KFOUNDRY_VLLM", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(DependencyError):
        find_vllm()
    rc = main(["serve", "--model", str(engine_ckpt), "--engine", "vllm"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and INSTALL_HINT in err and "pip install vllm" in err and len(err.splitlines()) == 1


def test_vllm_dialect():
    """What goes to vLLM's /v1/completions and how its answers and stream chunks are read (shapes as vLLM's
    OpenAI server sends them with return_token_ids)."""
    up = VllmUpstream(server=None)
    body = up.body([1, 5, 9], SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=0), 42, [510, 511],
                   frozenset({2, 3}), stream=True)
    assert body["prompt"] == [1, 5, 9] and body["max_tokens"] == 8 and body["return_token_ids"] is True
    assert body["top_k"] == -1 and body["seed"] == 42 and body["stop_token_ids"] == [2, 3] and body["stream"] is True
    assert body["logit_bias"] == {"510": -100, "511": -100} and body["repetition_penalty"] == 1.0
    assert "seed" not in up.body([1], SamplingParams(max_new_tokens=1), None, [], frozenset(), stream=False)
    chunk = {"object": "text_completion", "choices": [{"index": 0, "text": "안", "token_ids": [7, 8],
                                                        "finish_reason": None}]}
    assert up.parse(chunk) == ([7, 8], None)
    final = {"choices": [{"index": 0, "text": "녕 😀", "token_ids": [9, 10, 11], "finish_reason": "length"}]}
    assert up.parse(final) == ([9, 10, 11], "length")
    assert up.parse({"choices": [], "usage": {"completion_tokens": 5}}) == ([], None)
    with pytest.raises(RuntimeError, match="bad prompt"):
        up.parse({"error": {"message": "bad prompt", "type": "BadRequestError", "code": 400}})
    with pytest.raises(RuntimeError, match="0.10.2"):
        up.parse({"choices": [{"index": 0, "text": "hi", "finish_reason": None}]})
    with pytest.raises(RuntimeError, match="abort"):
        up.parse({"choices": [{"index": 0, "text": "", "token_ids": [], "finish_reason": "abort"}]})
