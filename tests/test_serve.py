"""Serving: per-row batched decoding, the continuous-batching scheduler, streaming text, and the OpenAI API.

The API tests run a real uvicorn server on a free loopback port and talk to it with the official `openai`
client. The model is a random-weight test-micro-sized checkpoint (kfoundry.serve.smoke): serving behaves the
same whatever the weights, and greedy answers can be checked token for token against `generate()`.
"""

from __future__ import annotations

import json
import random
import os
import signal
import subprocess
import sys
import threading
import time
import unicodedata

import httpx
import openai
import pytest
import torch

from kfoundry.checkpoint import load_model, load_tokenizer
from kfoundry.model.generate import SamplingParams, generate
from kfoundry.serve import openai_format as fmt
from kfoundry.serve.app import ServeConfig, app_from_checkpoint
from kfoundry.serve.batch import SlotCache, decode_step, prefill
from kfoundry.serve.errors import APIError
from kfoundry.serve.generation import Piece
from kfoundry.serve.plan import Limits, plan_request
from kfoundry.serve.sampling import sample_rows
from kfoundry.serve.scheduler import Scheduler, Ticket
from kfoundry.serve.schemas import ChatRequest, CompletionRequest
from kfoundry.serve.server import BackgroundServer
from kfoundry.serve.smoke import random_checkpoint
from kfoundry.serve.textstream import TextStream

MODEL = "kf-test"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", max_seq_len=512)


@pytest.fixture(scope="module")
def model_tok(ckpt):
    return load_model(ckpt), load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def served(ckpt):
    app, scheduler = app_from_checkpoint(ckpt, ServeConfig(model_name=MODEL, default_max_tokens=16), max_batch=8)
    with BackgroundServer(app) as srv:
        yield srv, scheduler
    scheduler.stop()


def client(srv, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw)


def reference(model, tok, prompt_ids: list[int], max_new: int) -> str:
    """What greedy decoding alone (no server, no batching) produces."""
    out = generate(model, [prompt_ids], SamplingParams(max_new_tokens=max_new), stop_ids={tok.eos_id, tok.eot_id})
    return tok.decode(out[0], skip_special=True)  # the server never shows special tokens


# ------------------------------------------------------------------------------------------- batching core


def test_slot_cache_rows_at_different_positions_match_full_forward(model_tok):
    """Rows of different lengths decoded together give each row the logits of a full forward pass over it,
    also after a finished row's slot is reused by compaction (`move`)."""
    model, _ = model_tok
    V = model.cfg.vocab_size
    cache = SlotCache(model.cfg, 4, 128, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (9, 1, 23)]
    with torch.inference_mode():
        for slot, s in enumerate(seqs):
            torch.testing.assert_close(prefill(model, cache, slot, s), model(torch.tensor([s]))[0, -1])
        for step in range(5):
            if step == 2:  # row 0 leaves; row 2 moves into its slot, as the scheduler does
                cache.move(2, 0, len(seqs[2]))
                seqs = [seqs[2], seqs[1]]
            tokens = torch.randint(0, V, (len(seqs),), generator=g)
            logits = decode_step(model, cache, tokens)  # each slot advances itself
            for i, s in enumerate(seqs):
                s.append(int(tokens[i]))
                torch.testing.assert_close(logits[i], model(torch.tensor([s]))[0, -1], atol=1e-4, rtol=1e-4)


def test_scheduler_joins_leaves_and_matches_generate(model_tok):
    """Requests submitted while others run join the batch; each greedy output equals decoding it alone,
    and a seeded sampled request gives the same tokens alone and in a crowd."""
    model, tok = model_tok
    sched = Scheduler(model, max_batch=4, max_queue=16).start()
    prompts = [tok.encode(t, bos=True) for t in ["대한민국은", "The quick", "오늘 날씨 😀", "2026년 11월", "x"]]
    lengths = [30, 5, 20, 12, 25]
    results: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    finished = {i: threading.Event() for i in range(len(prompts))}

    def listener(i):
        def on_events(events):
            for _, token, reason in events:
                if token is not None:
                    results[i].append(token)
                if reason is not None:
                    finished[i].set()
        return on_events

    tickets = [Ticket(p, SamplingParams(max_new_tokens=n), listener(i), stop_ids=frozenset())
               for i, (p, n) in enumerate(zip(prompts, lengths))]
    sched.submit(tickets[:2])
    while len(results[0]) < 3:  # the first two are decoding when the others arrive
        time.sleep(0.001)
    sched.submit(tickets[2:])
    for e in finished.values():
        assert e.wait(30)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], SamplingParams(max_new_tokens=lengths[i]))[0]
        assert results[i] == alone, f"request {i} differs when batched"
    st = sched.stats
    assert st.max_rows_in_step == 4  # the batch filled up (5 requests, 4 slots): a request waited for a slot
    assert st.decode_rows > st.decode_steps  # forward passes were shared
    assert st.completed == 5 and st.tokens_generated == sum(lengths)

    # Seeded sampling: the same tokens alone and in a crowd of other requests.
    def sample(crowd: int) -> list[int]:
        got, done = [], threading.Event()
        def on_events(events):
            got.extend(t for _, t, _ in events if t is not None)
            if any(r for _, _, r in events):
                done.set()
        others = [Ticket(prompts[1], SamplingParams(max_new_tokens=20, temperature=1.0), lambda e: None)
                  for _ in range(crowd)]
        sched.submit(others + [Ticket(prompts[0], SamplingParams(max_new_tokens=15, temperature=0.9, seed=7),
                                      on_events)])
        assert done.wait(30)
        return got

    assert sample(0) == sample(3)
    sched.stop()
    assert not sched.alive


def test_sample_rows_per_row_settings_and_distribution():
    """Each row follows its own settings, and sampled frequencies match softmax(logits / temperature)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    settings = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
                SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5),
                SamplingParams(temperature=0.5)]
    n = 3000  # rows per setting, all drawn in one call with the settings interleaved
    params = [settings[i % len(settings)] for i in range(n * len(settings))]
    gens = [torch.Generator().manual_seed(i) for i in range(len(params))]
    draws = torch.tensor(sample_rows(logits.expand(len(params), 4), params, gens)).view(n, len(settings))
    freq = lambda col: torch.bincount(draws[:, col], minlength=4).float() / n
    assert (draws[:, 0] == 0).all()  # greedy
    torch.testing.assert_close(freq(1), logits.softmax(-1), atol=0.03, rtol=0)
    assert set(draws[:, 2].tolist()) == {0, 1}  # top-k 2
    assert set(draws[:, 3].tolist()) == {0}  # top-p 0.5: the best token alone holds 64%
    torch.testing.assert_close(freq(4), (logits / 0.5).softmax(-1), atol=0.03, rtol=0)
    # Seeded rows are reproducible and do not depend on their neighbours.
    alone = sample_rows(logits[None], [params[7]], [torch.Generator().manual_seed(7)])
    assert alone == [int(draws.view(-1)[7])]


def test_scheduler_never_samples_ids_the_tokenizer_lacks():
    """A model vocabulary padded past the tokenizer's: the extra ids are never produced."""
    from kfoundry.config import ModelConfig
    from kfoundry.model.llama import Transformer

    cfg = ModelConfig(vocab_size=1024, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=128)
    sched = Scheduler(Transformer.build(cfg, seed=0), max_batch=2, vocab_size=300).start()
    got, done = [], threading.Event()

    def on_events(events):
        got.extend(t for _, t, _ in events if t is not None)
        if any(r for _, _, r in events):
            done.set()

    sched.submit([Ticket([1, 2, 3], SamplingParams(max_new_tokens=100, temperature=2.0, seed=0), on_events, n=2)])
    assert done.wait(30)
    sched.stop()
    assert len(got) >= 100 and max(got) < 300


def test_text_stream_holds_split_characters_and_stop_strings(model_tok, mixed_texts):
    _, tok = model_tok
    for text in mixed_texts:
        ids = tok.encode(text)
        ts = TextStream(tok)
        pieces = [ts.push(i) for i in ids] + [ts.finish()]
        assert "".join(pieces) == unicodedata.normalize("NFC", text) == ts.text
        assert all("\ufffd" not in p for p in pieces)  # a half Hangul syllable or emoji is never shown
    # Special tokens (chat markup) are never shown.
    ids = tok.encode_chat([{"role": "user", "content": "안녕 😀"}], add_generation_prompt=True)
    ts = TextStream(tok)
    out = "".join(ts.push(i) for i in ids) + ts.finish()
    assert out == "user\n\n안녕 😀assistant\n\n"
    # A stop string split across tokens is cut, with what follows it; text before it is all shown.
    text = "대한민국 헌법 제1조 ① 대한민국은 민주공화국이다."
    ts = TextStream(tok, stop=["민주공화국", "없는 문자열"])
    out = "".join(ts.push(i) for i in tok.encode(text)) + ts.finish()
    assert out == "대한민국 헌법 제1조 ① 대한민국은 " and ts.stopped
    # Text that only looks like the start of a stop string is released at the end.
    ts = TextStream(tok, stop=["다.!"])
    out = "".join(ts.push(i) for i in tok.encode(text)) + ts.finish()
    assert out == text and not ts.stopped


def test_text_stream_extend_equals_pushes(model_tok, mixed_texts):
    """`extend` (a whole answer's ids at once, as a forwarding engine reports them) emits exactly the text of
    pushing the ids one by one, however the ids are split into runs: also for random ids, which cut characters,
    form invalid UTF-8 and include special tokens (what a random model samples)."""
    _, tok = model_tok
    g = random.Random(0)
    seqs = [tok.encode(t) for t in mixed_texts] + [[g.randrange(tok.vocab_size) for _ in range(40)] for _ in range(40)]
    for ids in seqs:
        ref = TextStream(tok)
        want = "".join(ref.push(i) for i in ids) + ref.finish()
        for k in (0, 1, 3):
            cuts = [0, *sorted(g.sample(range(1, len(ids)), k=min(k, max(len(ids) - 1, 0)))), len(ids)]
            ts = TextStream(tok)
            got = "".join(ts.extend(ids[a:b]) for a, b in zip(cuts, cuts[1:])) + ts.finish()
            assert got == want == ts.text, (ids, cuts)
    with pytest.raises(ValueError, match="stop strings"):
        TextStream(tok, stop=["다."]).extend([1, 2])


# ------------------------------------------------------------------------------------------------ the API


def test_models_health_and_page(served):
    srv, _ = served
    models = client(srv).models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(srv.url + "/health").json()
    assert health["status"] == "ok" and health["context"] == 512 and health["max_batch"] == 8
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "app.js" in page.text
    assert httpx.get(srv.url + "/static/app.js").status_code == 200


def test_completions_match_generate(served, model_tok):
    srv, _ = served
    model, tok = model_tok
    c = client(srv)
    prompt = "대한민국 헌법 제1조 😀"
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ids = tok.encode(prompt, bos=True)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == reference(model, tok, ids, 12)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("length", "stop")

    # NFD input is normalised first: same tokens, same answer.
    nfd = c.completions.create(model=MODEL, prompt=unicodedata.normalize("NFD", prompt), max_tokens=12, temperature=0)
    assert nfd.choices[0].text == r.choices[0].text and nfd.usage.prompt_tokens == len(ids)

    # Several prompts, n choices each; token-id prompts too. Default max_tokens is the server's (16).
    many = c.completions.create(model=MODEL, prompt=["The quick", "2026년"], n=2, temperature=0)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == reference(model, tok, tok.encode("The quick", bos=True), 16)
    assert many.choices[2].text == reference(model, tok, tok.encode("2026년", bos=True), 16)
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text

    # Seeds: reproducible, and the n choices of one request differ from each other.
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 1.0, "top_p": 0.95, "n": 2,
          "seed": 42}
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert a.choices[0].text != a.choices[1].text


def test_stop_strings(served, model_tok):
    srv, _ = served
    c = client(srv)
    full = c.completions.create(model=MODEL, prompt="안녕하세요", max_tokens=30, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip()
    r = c.completions.create(model=MODEL, prompt="안녕하세요", max_tokens=30, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=MODEL, prompt="안녕하세요", max_tokens=30, temperature=0, stop=stop,
                                    stream=True)
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == r.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_chat_streaming_equals_non_streaming(served, model_tok):
    srv, _ = served
    model, tok = model_tok
    c = client(srv)
    messages = [{"role": "system", "content": "당신은 친절한 도우미입니다."},
                {"role": "user", "content": "안녕하세요! 오늘 기분 어때요? 😀"},
                {"role": "assistant", "content": "좋아요. Thanks!"},
                {"role": "user", "content": "2026년 계획을 알려 주세요."}]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference(model, tok, ids, 24)
    assert r.usage.prompt_tokens == len(ids)

    stream = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 3  # it really streamed
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # Multi-part content and the "developer" role (= system) are accepted.
    parts = [{"role": "developer", "content": "당신은 친절한 도우미입니다."},
             {"role": "user", "content": [{"type": "text", "text": "안녕하세요! "},
                                          {"type": "text", "text": "오늘 기분 어때요? 😀"}]},
             *messages[2:]]
    r2 = c.chat.completions.create(model=MODEL, messages=parts, max_tokens=24, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_concurrent_clients_share_forward_passes(served, model_tok):
    """Eight clients at once get exactly what each would get alone, in shared decode steps."""
    srv, scheduler = served
    c = client(srv)
    prompts = [f"{i}번째 질문: 대한민국의 수도는? Question {i} 😀" for i in range(8)]
    alone = [c.completions.create(model=MODEL, prompt=p, max_tokens=40, temperature=0).choices[0].text for p in prompts]
    before = scheduler.stats.as_dict()
    together: list[str | None] = [None] * 8

    def ask(i):
        together[i] = c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=40, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    after = scheduler.stats.as_dict()
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows / steps > 2, f"only {rows / steps:.2f} sequences per forward pass"


@pytest.mark.slow  # starts a second Python with torch: ~20 s on a busy 2-core machine
def test_cli_serve_with_api_key_file(ckpt, tmp_path):
    """`kfoundry serve` as a user starts it: a separate process, its own port, a key read from a file (so it is
    not in the process list), the Host check of a loopback server, and SIGTERM."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key_file = tmp_path / "key"
    key_file.write_text("sekret-from-file\n")
    env = {k: v for k, v in os.environ.items() if k != "KFOUNDRY_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "kfoundry", "serve", "--model", str(ckpt), "--port", str(port),
                             "--api-key-file", str(key_file), "--model-name", MODEL, "--log-level", "warning",
                             "--shutdown-grace", "0"],
                            env={**env, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert b"sekret" not in f.read()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret-from-file", max_retries=0)
        r = ok.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "안녕"}], max_tokens=5)
        assert r.usage.completion_tokens <= 5
        rebound = httpx.get(url + "/health", headers={"Host": "evil.example"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
        # SIGTERM with a stream in flight (grace 0): the stream ends with an error event, not a dropped connection.
        body = {"model": MODEL, "prompt": "안녕하세요 😀", "max_tokens": 480, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30,
                          headers={"Authorization": "Bearer sekret-from-file"}) as r:
            assert r.status_code == 200
            # The headers come as generation starts; greedy on these random weights never ends early, so
            # hundreds of tokens are still to come when the signal lands.
            proc.send_signal(signal.SIGTERM)
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["code"] == "server_shutting_down", events[-3:]
        assert len(events) < 480
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the exit status says why it stopped.
    assert proc.returncode in (0, -signal.SIGTERM)


def test_api_key_sources(tmp_path, monkeypatch):
    """--api-key-file, then --api-key, then $KFOUNDRY_API_KEY; an empty or missing file is a one-line error."""
    import argparse

    from kfoundry.serve_cli import api_key

    f = tmp_path / "key"
    f.write_text("  from-file  \nsecond line ignored\n")
    monkeypatch.setenv("KFOUNDRY_API_KEY", "from-env")
    assert api_key(argparse.Namespace(api_key_file=f, api_key="from-arg")) == "from-file"
    assert api_key(argparse.Namespace(api_key_file=None, api_key="from-arg")) == "from-arg"
    assert api_key(argparse.Namespace(api_key_file=None, api_key=None)) == "from-env"
    monkeypatch.delenv("KFOUNDRY_API_KEY")
    assert api_key(argparse.Namespace(api_key_file=None, api_key=None)) is None
    f.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        api_key(argparse.Namespace(api_key_file=f, api_key=None))
    with pytest.raises(FileNotFoundError):
        api_key(argparse.Namespace(api_key_file=tmp_path / "nope", api_key=None))


# --------------------------------------------------------------------- the parts, without FastAPI or a server


def test_plan_request_checks_and_tokenizes_without_fastapi(model_tok):
    """plan_request is a plain function: body + tokenizer + limits in, a GenerationPlan or an APIError out."""
    _, tok = model_tok
    limits = Limits(model_name=MODEL, context=64, max_batch=4, max_tokens=32, default_max_tokens=16, max_prompts=3)
    body = CompletionRequest.model_validate({"prompt": ["대한민국 😀", unicodedata.normalize("NFD", "한국어 2026")], "n": 2,
                                             "temperature": 1e-30, "stop": "끝", "seed": 3})
    plan = plan_request(body, tok, limits)
    assert plan.prompts == [tok.encode("대한민국 😀", bos=True), tok.encode("한국어 2026", bos=True)]  # NFC first
    assert not plan.chat and plan.n == 2 and plan.stop == ["끝"] and not plan.stream
    assert plan.params.temperature == 0.0  # below GREEDY_BELOW: greedy, not a NaN softmax
    assert plan.params.max_new_tokens == 16 and plan.params.seed == 3 and plan.params.top_p == 1.0

    chat = ChatRequest.model_validate({"messages": [{"role": "developer", "content": "친절하게 😀"},
                                                    {"role": "user", "content": [{"type": "text", "text": "안녕"}]}],
                                       "max_completion_tokens": 5, "stream": True, "temperature": 0.7,
                                       "stream_options": {"include_usage": True}, "model": MODEL})
    plan = plan_request(chat, tok, limits)
    assert plan.chat and plan.stream and plan.include_usage and plan.params.max_new_tokens == 5
    assert plan.prompts == [tok.encode_chat([{"role": "system", "content": "친절하게 😀"},
                                             {"role": "user", "content": "안녕"}], add_generation_prompt=True)]
    assert plan.params.temperature == 0.7

    def refused(body: dict, chat: bool = False) -> APIError:
        cls = ChatRequest if chat else CompletionRequest
        with pytest.raises(APIError) as e:
            plan_request(cls.model_validate(body), tok, limits)
        return e.value

    assert refused({"prompt": "x", "model": "gpt-4o"}).status == 404
    assert refused({"prompt": "x", "max_tokens": 33}).code == "max_tokens_too_large"
    e = refused({"prompt": "가나다라 " * 40})
    assert (e.code, e.param) == ("context_length_exceeded", "prompt")
    e = refused({"messages": [{"role": "user", "content": "가나다라 " * 40}]}, chat=True)
    assert (e.code, e.param) == ("context_length_exceeded", "messages")
    assert refused({"prompt": "안녕", "max_tokens": 62}).param == "max_tokens"
    assert refused({"prompt": "x", "n": 5}).param == "n"
    assert refused({"prompt": [5, tok.vocab_size]}).param == "prompt"
    assert refused({"prompt": ["a", "b", "c", "d"]}).param == "prompt"


def test_openai_format_parses_with_the_official_types():
    """The pure response builders produce what the `openai` package's own models accept, field for field."""
    import json

    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    u = fmt.usage(7, 3)
    assert u == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    c = Completion.model_validate(fmt.completion("cmpl-1", MODEL, False, ["안녕 😀", "b"], ["stop", "length"], u))
    assert [ch.text for ch in c.choices] == ["안녕 😀", "b"] and c.usage.total_tokens == 10
    cc = ChatCompletion.model_validate(fmt.completion("chatcmpl-1", MODEL, True, ["안녕"], ["length"], u))
    assert cc.choices[0].message.content == "안녕" and cc.choices[0].finish_reason == "length"
    events = [fmt.chunk("chatcmpl-1", MODEL, True, fmt.role_choices(1)),
              fmt.chunk("chatcmpl-1", MODEL, True, [fmt.piece_choice(Piece(0, "한국어"), True)]),
              fmt.chunk("chatcmpl-1", MODEL, True, [fmt.piece_choice(Piece(0, "", "stop"), True)]),
              fmt.chunk("chatcmpl-1", MODEL, True, [], u)]
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    chunks = [ChatCompletionChunk.model_validate(json.loads(e[6:])) for e in events]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[1].choices[0].delta.content == "한국어"
    assert chunks[2].choices[0].finish_reason == "stop" and chunks[3].usage.completion_tokens == 3
    assert "한국어" in events[1]  # UTF-8 on the wire, not \\u escapes
