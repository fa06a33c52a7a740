"""Serving under abuse: malformed bodies, oversized prompts, bad keys, disconnects mid-stream, a full queue,
timeouts. Every one gets an answer in OpenAI's error shape, and the server keeps serving afterwards."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

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
    """A non-streaming client that hangs up is noticed too (the server polls for the disconnect)."""
    srv, scheduler = served
    wait_idle(scheduler)
    before = scheduler.stats.as_dict()
    body = json.dumps({"model": MODEL, "prompt": "안녕하세요", "max_tokens": 1900, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
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
