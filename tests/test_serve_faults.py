"""Serving under abuse: malformed bodies, oversized prompts, bad keys, disconnects mid-stream, a full queue,
timeouts. Every one gets an answer in OpenAI's error shape, and the server keeps serving afterwards."""

from __future__ import annotations

import json
import select
import signal
import socket
import threading
import time

import httpx
import hypothesis
import openai
import pytest
import schemathesis

from engine_apps import ENGINES, serving

from kfoundry.checkpoint import load_model, load_tokenizer
from kfoundry.serve.app import ServeConfig, app_from_checkpoint, create_app
from kfoundry.serve.scheduler import Scheduler
from kfoundry.serve.server import BackgroundServer
from kfoundry.serve.smoke import random_checkpoint

MODEL = "kf-faults"
KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CTX = 2048  # long enough that a full-length answer takes seconds: room to disconnect in the middle


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("faults") / "ckpt", max_seq_len=CTX)


@pytest.fixture(scope="module")
def served(ckpt):
    cfg = ServeConfig(model_name=MODEL, api_key=KEY, max_tokens=CTX - 8, max_body_bytes=256 * 1024)
    app, scheduler = app_from_checkpoint(ckpt, cfg, max_batch=4, max_queue=8)
    with BackgroundServer(app) as srv:
        yield srv, scheduler
    scheduler.stop()


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    return err


def assert_alive(url: str) -> None:
    """The server still answers a normal request after whatever the test did to it."""
    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=30,
                   json={"model": MODEL, "prompt": "안녕하세요 😀", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def wait_idle(scheduler, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while scheduler.load()["running"] or scheduler.load()["waiting"]:
        assert time.monotonic() < deadline, f"scheduler still busy: {scheduler.load()}"
        time.sleep(0.02)


MALFORMED = [
    (b'{"model": "kf-faults", "prompt": "x"', "invalid_json"),  # truncated
    (b"\xff\xfe not utf-8", "invalid_json"),
    (b"", "invalid_json"),
    (b"[1, 2, 3]", "invalid_value"),  # JSON, but not an object
    (b'{"model": "kf-faults"}', "invalid_value"),  # no prompt
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "5"}).encode(), "invalid_value"),  # string for int
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2.5}).encode(), "invalid_value"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode(), "invalid_value"),
    (json.dumps({"model": MODEL, "prompt": "x", "temperature": -1}).encode(), "invalid_value"),
    (b'{"model": "kf-faults", "prompt": "x", "temperature": NaN}', "invalid_value"),
    (json.dumps({"model": MODEL, "prompt": "x", "top_p": 0}).encode(), "invalid_value"),
    (json.dumps({"model": MODEL, "prompt": "x", "stream": "yes"}).encode(), "invalid_value"),
    (json.dumps({"model": MODEL, "prompt": "x", "n": True}).encode(), "invalid_value"),
    (json.dumps({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).encode(), "invalid_value"),
    (json.dumps({"model": MODEL, "prompt": {"text": "x"}}).encode(), "invalid_value"),
    (json.dumps({"model": MODEL, "prompt": []}).encode(), "invalid_value"),
    (json.dumps({"model": MODEL, "prompt": "x", "logprobs": 5}).encode(), "invalid_value"),  # not implemented
    (json.dumps({"model": MODEL, "prompt": "x", "presence_penalty": 1.0}).encode(), "invalid_value"),
    (json.dumps({"model": MODEL, "prompt": [[]]}).encode(), None),  # empty token-id prompt
    (json.dumps({"model": MODEL, "prompt": [10**9]}).encode(), None),  # token id outside the vocabulary
    (json.dumps({"model": MODEL, "prompt": ["x"] * 17}).encode(), None),  # too many prompts
]

MALFORMED_CHAT = [
    {"model": MODEL, "messages": "안녕"},
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": [{"role": "robot", "content": "안녕"}]},
    {"model": MODEL, "messages": [{"role": "user"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": 42}]},
    {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 5},  # above the batch size (4)
]


def test_malformed_bodies_are_400(served):
    srv, _ = served
    for body, code in MALFORMED:
        r = httpx.post(srv.url + "/v1/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
        err = assert_openai_error(r, 400, code)
        assert err["type"] == "invalid_request_error", body
    for body in MALFORMED_CHAT:
        assert_openai_error(httpx.post(srv.url + "/v1/chat/completions", json=body, headers=AUTH), 400)
    # The official client raises its usual exception for a bad value.
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model=MODEL, prompt="x", temperature=5)
    # Body over the size limit: refused before it is read.
    big = json.dumps({"model": MODEL, "prompt": "가" * 200_000}).encode()
    assert_openai_error(httpx.post(srv.url + "/v1/completions", content=big,
                                   headers={**AUTH, "Content-Type": "application/json"}), 413, "body_too_large")
    # Unknown paths and methods, in the same error shape.
    assert_openai_error(httpx.get(srv.url + "/v1/nothing", headers=AUTH), 404)
    assert_openai_error(httpx.get(srv.url + "/v1/completions", headers=AUTH), 405)
    assert_alive(srv.url)


def test_oversized_prompts_and_max_tokens(served):
    srv, _ = served
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    long_prompt = "대한민국 헌법 제1조 ① 대한민국은 민주공화국이다. The quick brown fox 😀 " * 200
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # above the server's --max-tokens
        c.completions.create(model=MODEL, prompt="x", max_tokens=CTX)
    assert e.value.code == "max_tokens_too_large"
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens past the context
        c.completions.create(model=MODEL, prompt="안녕 " * 300, max_tokens=CTX - 100)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    assert_alive(srv.url)


def test_api_key(served):
    srv, _ = served
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    assert_openai_error(httpx.post(srv.url + "/v1/completions", json=body), 401, "invalid_api_key")
    assert_openai_error(httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer no"}),
                        401, "invalid_api_key")
    assert_openai_error(httpx.get(srv.url + "/v1/models", headers={"Authorization": KEY}), 401)  # no "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
    # The page and the health check stay public; the page then asks for the key.
    assert httpx.get(srv.url + "/").status_code == 200
    assert httpx.get(srv.url + "/health").json()["auth"] is True


def test_disconnect_mid_stream_cancels_generation(served):
    srv, scheduler = served
    wait_idle(scheduler)
    before = scheduler.stats.as_dict()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "길게 말해 주세요 😀"}], "max_tokens": 1900,
            "temperature": 0, "stream": True}  # greedy: this random model never picks a stop token, so only a
    # disconnect can end the request before 1900 tokens (sampling would hit <|eot_id|> by chance)
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 4:
                break  # leaving the block closes the connection mid-stream
    wait_idle(scheduler)
    after = scheduler.stats.as_dict()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 1900  # it stopped early
    assert_alive(srv.url)


def test_disconnect_while_waiting_for_a_full_answer(served):
    """A non-streaming client that hangs up is noticed too (the server waits for the disconnect beside the answer)."""
    srv, scheduler = served
    wait_idle(scheduler)
    before = scheduler.stats.as_dict()
    body = json.dumps({"model": MODEL, "prompt": "안녕하세요", "max_tokens": 1900, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((srv.host, srv.port)) as s:
        s.sendall(head + body)
        deadline = time.monotonic() + 10
        while not scheduler.load()["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    wait_idle(scheduler)
    after = scheduler.stats.as_dict()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 1900
    assert_alive(srv.url)


def test_full_queue_is_429_then_everyone_is_served(ckpt):
    """With the scheduler held back, requests fill the queue; the next one is refused with Retry-After.
    Once the scheduler runs, the queued requests complete normally."""
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    scheduler = Scheduler(model, max_batch=1, max_queue=2)  # not started yet
    app = create_app(scheduler, tok, ServeConfig(model_name=MODEL, retry_after_s=2))
    with BackgroundServer(app) as srv:
        assert httpx.get(srv.url + "/health").status_code == 503  # not ready while the scheduler is stopped
        results: list[httpx.Response | None] = [None, None]
        body = {"model": MODEL, "prompt": "대한민국 😀", "max_tokens": 8, "temperature": 0}

        def ask(i):
            results[i] = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while scheduler.load()["waiting"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=10)
        assert_openai_error(r, 429, "queue_full")
        assert r.headers["Retry-After"] == "2"
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "안녕"}], stream=True)
        assert scheduler.stats.rejected_queue_full == 2
        scheduler.start()
        for t in threads:
            t.join(60)
        assert [x.status_code for x in results] == [200, 200]
        assert results[0].json()["choices"] == results[1].json()["choices"]
        assert httpx.get(srv.url + "/health").status_code == 200
    scheduler.stop()


def test_request_timeout(ckpt):
    """A request that waits past the timeout gets 504 (or a timeout event in its stream) and leaves the queue."""
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    scheduler = Scheduler(model, max_batch=2, max_queue=4)  # held back, so nothing can finish in time
    app = create_app(scheduler, tok, ServeConfig(model_name=MODEL, request_timeout=0.5))
    with BackgroundServer(app) as srv:
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4}, timeout=10)
        assert_openai_error(r, 504, "timeout")
        assert 0.4 < time.monotonic() - t0 < 5
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=10, json={
                "model": MODEL, "messages": [{"role": "user", "content": "안녕"}], "stream": True}) as s:
            assert s.status_code == 200
            payloads = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert payloads[-1]["error"]["code"] == "timeout"
        scheduler.start()
        deadline = time.monotonic() + 10
        while scheduler.stats.cancelled < 2:  # both timed-out tickets were dropped, not run
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert scheduler.stats.tokens_generated == 0
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4}, timeout=10)
        assert r.status_code == 200
    scheduler.stop()


# ------------------------------------------------------------------------ hostile clients (issue 17, serving)


def raw_request(srv, head: bytes, body: bytes = b"", wait: float = 5.0) -> bytes:
    """Send raw bytes on a fresh loopback connection and return what the server answers within `wait` seconds
    (b"" if it answers nothing). The request may be incomplete on purpose: the server must answer anyway."""
    with socket.create_connection((srv.host, srv.port), timeout=wait) as s:
        s.sendall(head + body)
        out = b""
        try:
            while b"\r\n\r\n" not in out or len(out) < out.find(b"\r\n\r\n") + 4 + content_length(out):
                data = s.recv(65536)
                if not data:
                    break
                out += data
        except TimeoutError:
            pass
        return out


def content_length(response: bytes) -> int:
    for line in response.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def status_of(response: bytes) -> int | None:
    return int(response.split(b" ")[1]) if response.startswith(b"HTTP/1.1 ") else None


def json_of(response: bytes) -> dict:
    return json.loads(response[response.find(b"\r\n\r\n") + 4:])


def test_api_key_is_checked_before_the_body_is_read(served):
    """A client without the key gets 401 from its headers alone: the server does not wait for (or hold) a body."""
    srv, _ = served
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    for auth in (b"", b"Authorization: Bearer wrong\r\n"):
        r = raw_request(srv, head.replace(b"\r\n\r\n", b"\r\n" + auth + b"\r\n") if auth else head)
        assert status_of(r) == 401, r[:200]
        assert json_of(r)["error"]["code"] == "invalid_api_key"
    # A declared body far over the limit is refused from the header too, key first.
    r = raw_request(srv, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 200000000\r\n\r\n")
    assert status_of(r) == 401
    assert_alive(srv.url)


def test_chunked_body_is_counted_as_it_arrives(served):
    """A chunked body (no Content-Length) past the limit gets 413 as soon as the limit is crossed, while the
    client is still sending; today's header-only check let it through whole."""
    srv, _ = served
    limit = 256 * 1024
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"x" * 16384
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(limit // len(piece) + 2))
    r = raw_request(srv, head, chunks)  # no terminating chunk: the body never ends, the answer must come anyway
    assert status_of(r) == 413, r[:200]
    assert json_of(r)["error"]["code"] == "body_too_large"
    # A chunked body under the limit is served as usual.
    body = json.dumps({"model": MODEL, "prompt": "안녕하세요 😀", "max_tokens": 2, "temperature": 0}).encode()
    r = raw_request(srv, head, b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert status_of(r) == 200, r[:300]
    assert_alive(srv.url)


@pytest.fixture()
def guarded(ckpt):
    """A server with short limits: 6 s for headers, 1 s for a body, 230 connections."""
    cfg = ServeConfig(model_name=MODEL, max_tokens=64, header_timeout=6.0, body_timeout=1.0, max_connections=230)
    app, scheduler = app_from_checkpoint(ckpt, cfg, max_batch=2, max_queue=8)
    with BackgroundServer(app) as srv:
        yield srv
    scheduler.stop()


def test_slow_clients_are_timed_out_and_capped(guarded):
    """200 slowloris sockets are held open: /health and a real client are still served at once, a connection
    past the cap is answered 503, and the slow ones are closed with 408 when their header time is up."""
    srv = guarded
    slow = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(200)]
    try:
        for s in slow:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        for _ in range(3):  # trickle a header line on every socket, as slowloris does to look alive
            for s in slow:
                s.sendall(b"X-Slow: 1\r\n")
            assert httpx.get(srv.url + "/health", timeout=2).status_code == 200
        r = httpx.post(srv.url + "/v1/completions", timeout=10,
                       json={"model": MODEL, "prompt": "안녕하세요 😀", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
        assert time.monotonic() - t0 < 5.5, "the checks above must run before the slow sockets time out"
        # Past the cap (230 open connections), a new connection is answered 503 without being read.
        extra = [socket.create_connection((srv.host, srv.port), timeout=5) for _ in range(40)]
        readable, _, _ = select.select(extra, [], [], 1.0)
        time.sleep(0.2)
        readable, _, _ = select.select(extra, [], [], 0)
        answers = [status_of(s.recv(4096)) for s in readable]
        for s in extra:
            s.close()
        assert answers and set(answers) == {503} and len(answers) >= 5, answers  # 200 + 40 > 230
        # The slow sockets are closed with 408 once 6 s have passed since they connected.
        for s in slow:
            s.settimeout(max(0.1, t0 + 12 - time.monotonic()))
            got = s.recv(4096)
            assert status_of(got) == 408, got[:100]
    finally:
        for s in slow:
            s.close()
    # A body that stops arriving gets 408 after the body timeout (1 s).
    t0 = time.monotonic()
    r = raw_request(srv, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n", b'{"model": ', wait=5)
    assert status_of(r) == 408 and json_of(r)["error"]["code"] == "body_timeout"
    assert 0.9 < time.monotonic() - t0 < 4
    assert httpx.get(srv.url + "/health", timeout=2).status_code == 200


def test_host_header_is_checked_on_loopback(guarded):
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends `Host: evil.example`."""
    srv = guarded
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    for host in ("evil.example", "evil.example:%d" % srv.port, "127.0.0.1.nip.io"):
        r = httpx.post(srv.url + "/v1/completions", json=body, headers={"Host": host})
        err = assert_openai_error(r, 400, "invalid_host")
        assert "--allow-host" in err["message"]
        assert_openai_error(httpx.get(srv.url + "/", headers={"Host": host}), 400, "invalid_host")
    for host in (f"localhost:{srv.port}", f"127.0.0.1:{srv.port}", "LOCALHOST"):
        assert httpx.post(srv.url + "/v1/completions", json=body, headers={"Host": host}).status_code == 200


def test_host_policy_follows_the_bind_address():
    from kfoundry.serve_cli import allowed_hosts
    from kfoundry.serve.hosts import host_name, is_loopback

    assert allowed_hosts("127.0.0.1", []) == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts("::1", ["my.box"])[-1] == "my.box"
    assert allowed_hosts("0.0.0.0", []) is None  # a public server cannot know its names
    assert allowed_hosts("0.0.0.0", ["api.example.com"]) == ("api.example.com",)
    assert [is_loopback(h) for h in ("127.0.0.2", "localhost", "[::1]", "0.0.0.0", "10.0.0.1")] == \
        [True, True, True, False, False]
    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:80", "::1", "a.b")] == ["localhost", "::1", "::1", "a.b"]


LONE = "\ud800"


def test_bad_values_are_4xx_naming_their_field(served):
    """Lone surrogates, out-of-range seeds and every refused option: a 400 whose `param` is the field."""
    srv, _ = served
    base = {"model": MODEL, "prompt": "안녕", "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "안녕"}], "max_tokens": 2}
    cases = [
        ("/v1/completions", {**base, "prompt": f"안녕{LONE}하세요"}, "prompt"),
        ("/v1/completions", {**base, "prompt": ["ok", LONE]}, "prompt.1"),
        ("/v1/completions", {**base, "stop": [LONE]}, "stop.0"),
        ("/v1/completions", {**base, "model": LONE}, "model"),
        ("/v1/completions", {**base, "user": LONE}, "user"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": f"x{LONE}"}]},
         "messages.0.content"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
         "messages.0.content.0.text"),
        ("/v1/completions", {**base, "seed": 2**64}, "seed"),
        ("/v1/completions", {**base, "seed": -(2**63) - 1}, "seed"),
        ("/v1/completions", {**base, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {**base, "prompt": []}, "prompt"),
        ("/v1/completions", {**base, "logprobs": 5}, "logprobs"),
        ("/v1/completions", {**base, "presence_penalty": 1.0}, "presence_penalty"),
        ("/v1/completions", {**base, "frequency_penalty": -0.5}, "frequency_penalty"),
        ("/v1/completions", {**base, "logit_bias": {"5": 10}}, "logit_bias"),
        ("/v1/completions", {**base, "echo": True}, "echo"),
        ("/v1/completions", {**base, "suffix": "끝"}, "suffix"),
        ("/v1/completions", {**base, "best_of": 3}, "best_of"),
        ("/v1/completions", {**base, "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {**base, "prompt": {"text": "x"}}, "prompt"),
        ("/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {**chat, "tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {**chat, "top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {**chat, "logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {**chat, "modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {**chat, "max_completion_tokens": 0}, "max_completion_tokens"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ]
    for path, body, param in cases:
        # json.dumps writes a lone surrogate as the escape "\ud800", exactly what a hostile client sends
        r = httpx.post(srv.url + path, content=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"})
        err = assert_openai_error(r, 400)
        assert err["param"] == param, (body, err)
        assert err["message"].startswith(param + ":"), err
    # The edges of what is accepted; neutral values of refused options; options documented as ignored.
    ok = [{**base, "seed": 2**63 - 1, "n": 2, "temperature": 1.0}, {**base, "seed": -(2**63)},
          {**base, "logprobs": None, "presence_penalty": 0, "best_of": 1, "echo": False},
          {**base, "user": "u-1", "store": False, "metadata": {"k": "v"}, "service_tier": "auto"}]
    for body in ok:
        assert httpx.post(srv.url + "/v1/completions", json=body, headers=AUTH).status_code == 200, body
    r = httpx.post(srv.url + "/v1/chat/completions", headers=AUTH,
                   json={**chat, "response_format": {"type": "text"}, "tool_choice": "none",
                         "parallel_tool_calls": True})
    assert r.status_code == 200
    assert_alive(srv.url)


def test_unsupported_options_are_all_refused_and_documented(served):
    """Every OpenAI option we do not implement is refused by name on the endpoint where OpenAI defines it, and
    docs/serve.md lists it, with the ignored ones, so the rule is the same in the code and in the docs."""
    from pathlib import Path

    from kfoundry.serve.schemas import IGNORED, UNSUPPORTED_CHAT, UNSUPPORTED_COMMON, UNSUPPORTED_COMPLETION

    srv, _ = served
    docs = (Path(__file__).parents[1] / "docs" / "serve.md").read_text(encoding="utf-8")
    ko = (Path(__file__).parents[1] / "docs" / "serve.ko.md").read_text(encoding="utf-8")
    endpoints = [("/v1/completions", {"prompt": "x"}, {**UNSUPPORTED_COMMON, **UNSUPPORTED_COMPLETION}),
                 ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
                  {**UNSUPPORTED_COMMON, **UNSUPPORTED_CHAT})]
    for path, body, table in endpoints:
        for name in table:
            assert f"`{name}`" in docs and f"`{name}`" in ko, name
            r = httpx.post(srv.url + path, headers=AUTH, json={**body, "max_tokens": 1, name: "surely not neutral"})
            assert assert_openai_error(r, 400)["param"] == name
    for name in IGNORED:
        assert f"`{name}`" in docs and f"`{name}`" in ko, name


def test_tiny_temperature_is_greedy(served):
    """1e-39 is a valid float; dividing logits by it overflows to NaN. It is served as greedy, not as empty text."""
    srv, _ = served
    body = {"model": MODEL, "prompt": "대한민국 헌법 😀", "max_tokens": 8}
    greedy = httpx.post(srv.url + "/v1/completions", headers=AUTH, json={**body, "temperature": 0}).json()
    for t in (1e-39, 5e-324, 1e-6):
        r = httpx.post(srv.url + "/v1/completions", headers=AUTH, json={**body, "temperature": t, "seed": 1})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == greedy["choices"][0]["text"] != ""
        assert r.json()["usage"]["completion_tokens"] == greedy["usage"]["completion_tokens"]


# ----------------------------------------------------------------------------------- graceful shutdown


def held_server(ckpt, grace: float):
    """A server whose scheduler is not started yet, so requests stay in flight until the test says."""
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    scheduler = Scheduler(model, max_batch=2, max_queue=8)
    app = create_app(scheduler, tok, ServeConfig(model_name=MODEL, shutdown_grace=grace))
    return BackgroundServer(app), scheduler


def start_in_flight(srv, scheduler) -> tuple[list, list[threading.Thread]]:
    """One full-answer request and one stream, both waiting in the scheduler's queue."""
    out: list = [None, None]

    def full():
        out[0] = httpx.post(srv.url + "/v1/completions", timeout=30,
                            json={"model": MODEL, "prompt": "안녕하세요 😀", "max_tokens": 6, "temperature": 0})

    def stream():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "안녕"}], "max_tokens": 6,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
            out[1] = (r.status_code, [line for line in r.iter_lines() if line.startswith("data: ")])

    threads = [threading.Thread(target=full), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while scheduler.load()["waiting"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return out, threads


def refuses_connections(srv, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            httpx.get(srv.url + "/health", timeout=1)
        except httpx.TransportError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_ends_what_outlives_the_grace_period_with_503(ckpt):
    """SIGTERM (uvicorn's handle_exit, what its signal handler calls): no new connections; what is still in
    flight when the grace period ends gets OpenAI's 503 body, or a last error event in its stream."""
    srv, scheduler = held_server(ckpt, grace=1.0)
    with srv:
        out, threads = start_in_flight(srv, scheduler)
        t0 = time.monotonic()
        srv.server.handle_exit(signal.SIGTERM, None)
        assert refuses_connections(srv)
        for t in threads:
            t.join(20)
        assert 0.9 < time.monotonic() - t0 < 6
        assert_openai_error(out[0], 503, "server_shutting_down")
        status, events = out[1]
        assert status == 200
        last = json.loads(events[-1][6:])
        assert last["error"]["code"] == "server_shutting_down" and "data: [DONE]" not in events
        srv.thread.join(10)
        assert not srv.thread.is_alive()
    scheduler.stop()


def test_sigterm_lets_requests_in_flight_finish(ckpt):
    """Requests that finish within the grace period are answered in full, and the server then stops at once."""
    srv, scheduler = held_server(ckpt, grace=20.0)
    with srv:
        out, threads = start_in_flight(srv, scheduler)
        t0 = time.monotonic()
        srv.server.handle_exit(signal.SIGTERM, None)
        assert refuses_connections(srv)
        scheduler.start()
        for t in threads:
            t.join(20)
        assert out[0].status_code == 200 and out[0].json()["usage"]["completion_tokens"] >= 1
        status, events = out[1]
        assert status == 200 and events[-1] == "data: [DONE]"
        srv.thread.join(15)
        assert not srv.thread.is_alive() and time.monotonic() - t0 < 15  # did not wait out the 20 s grace
    scheduler.stop()


# ------------------------------------------------------------------------------------------- schema fuzzing


@pytest.fixture(scope="module", params=ENGINES)
def fuzz_url(request, tmp_path_factory):
    """A small server with a key: context 64 and at most 8 new tokens, so that every request the fuzzer makes
    is answered in milliseconds (larger max_tokens are 400s, which the schema declares). Once over our torch
    engine and once over llama.cpp's llama-server: the schema and the error shapes are the front's either way."""
    ckpt = random_checkpoint(tmp_path_factory.mktemp("fuzz") / "ckpt", max_seq_len=64)
    cfg = ServeConfig(model_name=MODEL, api_key=KEY, request_timeout=30, max_tokens=8, default_max_tokens=4)
    with serving(ckpt, cfg, request.param, max_batch=4, max_queue=64) as srv:
        yield srv.url


def test_fuzzing_the_openapi_schema(fuzz_url):
    """schemathesis makes requests from the running server's own /openapi.json for every operation, both
    schema-valid ones and deliberately invalid ones: no answer is a 5xx, invalid data is refused, and every
    answer (status, content type, body) is one the schema declares; requests without the key get 401.

    Not checked: that every schema-valid body is accepted (positive_data_acceptance). Some limits depend on
    the model — a prompt's length in tokens against the context — and are 400s the schema cannot express.
    (schemathesis' pytest plugin does not run under pytest 9, so each operation's strategy is driven here.)"""
    schema = schemathesis.openapi.from_url(fuzz_url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /health", "GET /v1/models", "GET /v1/models/{name}", "POST /v1/completions",
        "POST /v1/chat/completions"}
    statuses: dict[tuple[str, str], set[int]] = {}
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET" and "{" not in op.path:
                continue  # no input to make invalid
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            @hypothesis.settings(max_examples=15, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck),
                                 phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
            def check(case):
                r = case.call_and_validate(headers=AUTH,
                                           excluded_checks=[schemathesis.checks.positive_data_acceptance])
                statuses.setdefault((op.path, mode.value), set()).add(r.status_code)

            check()
    # It really exercised the server: generations were made, and invalid bodies were refused.
    assert 200 in statuses[("/v1/completions", "positive")] and 200 in statuses[("/v1/chat/completions", "positive")]
    assert statuses[("/v1/chat/completions", "negative")] >= {400}
