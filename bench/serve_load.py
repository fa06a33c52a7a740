"""Load test for `kfoundry serve`, on loopback only: concurrency levels, latency, and the batching speedup.

    python bench/serve_load.py                       # random-weight cpu-tiny-shaped model, 1/4/16 clients
    python bench/serve_load.py --model runs/x/ckpt/step-000400 --clients 1,4,16 --requests 48
    python bench/serve_load.py --slow-clients 200    # the same levels again while 200 slowloris sockets are held

It starts `kfoundry serve` as a subprocess on 127.0.0.1 (a free port), then for each concurrency level runs
a fixed set of /v1/completions requests with that many clients at once: each client sends its next
request when the previous one is answered. Every level is bounded by `--requests` and `--time-limit`.

Reported per level: requests/s, generated tokens/s, p50/p99 latency, errors by kind, and how many sequences
shared each forward pass on average (from /health). The peer for the batching claim is the same server
answering the same requests one by one (1 client): the speedup is the tokens/s at `--speedup-clients`
(default 8) divided by the tokens/s at 1 client. Goal: >= 2x.

With `--slow-clients N`, every level is run twice on the same server, one right after the other: once as
above, then again while N "slowloris" sockets are held open — each sends a request line and then one header
line per second, never finishing its headers, and is reopened as soon as the server closes it (header
timeout), so N are held throughout. The peer for that figure is the same level without them: the ratio of
tokens/s shows what the slow clients cost real ones. /health latency is sampled before each level, with the
slow sockets held and without them.

Nothing here leaves the machine: the server binds 127.0.0.1 and the clients only talk to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

PROMPTS = [
    "대한민국 헌법 제1조는", "The capital of Korea is", "오늘 날씨가 좋아서", "언어 모델은 다음 토큰을",
    "In 2026, the price was", "서울에서 부산까지", "Once upon a time", "점심으로 김치찌개를 먹고 😀",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kfoundry", "serve", "--model", str(model), "--host", "127.0.0.1", "--port",
           str(port), "--max-batch", str(args.max_batch), "--max-queue", str(max(64, max(args.clients))),
           "--model-name", "bench", "--log-level", "warning"]
    if args.server_threads:
        cmd += ["--threads", str(args.server_threads)]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start within 120 s")
        time.sleep(0.3)


class SlowClients:
    """`n` slowloris sockets held open on a background thread until `stop()` (bounded by `max_s` seconds)."""

    def __init__(self, host: str, port: int, n: int, max_s: float = 3600.0) -> None:
        self.addr, self.n, self.max_s = (host, port), n, max_s
        self.reopened = 0
        self.held = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)

    def _open(self) -> socket.socket | None:
        try:
            s = socket.create_connection(self.addr, timeout=2)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            return s
        except OSError:
            return None

    def _run(self) -> None:
        socks = [self._open() for _ in range(self.n)]
        deadline = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            for i, s in enumerate(socks):
                try:
                    if s is None:
                        raise OSError
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:  # closed by the server (header timeout): come back, as an attacker would
                    if s is not None:
                        s.close()
                    socks[i] = self._open()
                    self.reopened += 1
            self.held = sum(s is not None for s in socks)
            self._stop.wait(1.0)
        for s in socks:
            if s is not None:
                s.close()

    def __enter__(self) -> "SlowClients":
        self._thread.start()
        deadline = time.monotonic() + 30
        while self.held < self.n and time.monotonic() < deadline:
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def health_latency(url: str, samples: int = 20) -> dict:
    """/health round trips, one every 50 ms: the median and the worst."""
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        try:
            ok = httpx.get(url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            ok = False
        times.append(time.perf_counter() - t0 if ok else float("inf"))
        time.sleep(0.05)
    return {"p50_ms": round(statistics.median(times) * 1000, 1), "max_ms": round(max(times) * 1000, 1),
            "failed": sum(t == float("inf") for t in times)}


def run_level(url: str, clients: int, n_requests: int, max_tokens: int, time_limit: float) -> dict:
    """`clients` concurrent loops share a budget of `n_requests`; none starts a request after `time_limit`."""
    stats0 = httpx.get(url + "/health").json()["stats"]
    start = time.perf_counter()
    latencies, tokens, errors = asyncio.run(drive(url, clients, n_requests, max_tokens, time_limit, start))
    wall = time.perf_counter() - start
    stats1 = httpx.get(url + "/health").json()["stats"]
    steps = stats1["decode_steps"] - stats0["decode_steps"]
    rows = stats1["decode_rows"] - stats0["decode_rows"]
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "tokens": tokens,
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "rows_per_step": round(rows / steps, 2) if steps else 0.0,
    }


async def drive(url: str, clients: int, n_requests: int, max_tokens: int, time_limit: float,
                start: float) -> tuple[list[float], int, dict[str, int]]:
    """The clients themselves: latencies of answered requests, tokens generated, errors by kind."""
    latencies: list[float] = []
    tokens = 0
    errors: dict[str, int] = {}
    next_index = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index, tokens
        while next_index < n_requests and time.perf_counter() - start < time_limit:
            i = next_index
            next_index += 1
            body = {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0.8, "seed": i}
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/completions", json=body)
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            if r.status_code != 200:
                errors[f"HTTP {r.status_code}"] = errors.get(f"HTTP {r.status_code}", 0) + 1
                continue
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=time_limit + 60, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, tokens, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: a random cpu-tiny-shaped one)")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    ap.add_argument("--speedup-clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per level before it stops sending")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads in the server (1 leaves a core for the clients; 0 = torch's default)")
    ap.add_argument("--slow-clients", type=int, default=0,
                    help="also run every level while this many slowloris sockets are held (e.g. 200)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    levels = sorted(set(args.clients) | {1, args.speedup_clients})

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from kfoundry.serve.smoke import random_checkpoint

            # cpu-tiny's shape (kfoundry.config PRESETS), with its 4096-entry output layer.
            model = random_checkpoint(Path(tmp) / "ckpt", dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512,
                                      max_seq_len=512, model_vocab_size=4096)
        port = free_port()
        proc = start_server(model, port, args)
        url = f"http://127.0.0.1:{port}"
        results, slow_results, health, base_health = [], [], [], []
        held = reopened = 0
        try:
            for c in levels:  # warm-up: first-call allocations and each batch shape's first pass, not measured
                run_level(url, c, c, 8, 30)
            for c in levels:
                if args.slow_clients:
                    base_health.append(health_latency(url))
                results.append(run_level(url, c, args.requests, args.max_tokens, args.time_limit))
                if args.slow_clients:  # the same level right after, while the slow sockets are held
                    with SlowClients("127.0.0.1", port, args.slow_clients) as slow:
                        health.append(health_latency(url))
                        slow_results.append(run_level(url, c, args.requests, args.max_tokens, args.time_limit))
                        held, reopened = min(held or slow.held, slow.held), reopened + slow.reopened
        finally:
            proc.terminate()
            proc.wait(30)

    by_clients = {r["clients"]: r for r in results}
    one, many = by_clients[1], by_clients[args.speedup_clients]
    speedup = many["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else float("nan")
    print(f"model: {args.model or 'random cpu-tiny shape (dim 192, 4 layers, vocab 4096)'}; "
          f"max_tokens {args.max_tokens}; {args.requests} requests per level; server max_batch {args.max_batch}; "
          f"server threads {args.server_threads or 'default'}; {os.cpu_count()} CPUs")
    print()
    print("| clients | requests | errors | requests/s | tokens/s | p50 latency (s) | p99 latency (s) | rows/step |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        print(f"| {r['clients']} | {r['requests']} | {errs} | {r['requests_per_s']} | {r['tokens_per_s']} | "
              f"{r['p50_s']} | {r['p99_s']} | {r['rows_per_step']} |")
    print()
    print(f"batching speedup at {args.speedup_clients} clients vs one by one: {speedup:.2f}x tokens/s "
          f"({many['tokens_per_s']} vs {one['tokens_per_s']}; goal >= 2x)")
    report = {"levels": results, "speedup": round(speedup, 2)}
    if args.slow_clients:
        print()
        print(f"with {args.slow_clients} slowloris sockets held during each level (fewest held at a level's end: "
              f"{held}; reopened after the server closed them: {reopened}):")
        for c, h, b in zip(levels, health, base_health):
            print(f"/health before the {c}-client level: p50 {h['p50_ms']} ms, worst {h['max_ms']} ms, failed "
                  f"{h['failed']}/20 (without slow clients: p50 {b['p50_ms']} ms, worst {b['max_ms']} ms, failed "
                  f"{b['failed']}/20)")
        print()
        print("| clients | requests | errors | tokens/s | tokens/s without slow clients | ratio | p50 latency (s) | "
              "p99 latency (s) |")
        print("|---:|---:|---|---:|---:|---:|---:|---:|")
        for r, peer in zip(slow_results, results):
            errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
            ratio = r["tokens_per_s"] / peer["tokens_per_s"] if peer["tokens_per_s"] else float("nan")
            print(f"| {r['clients']} | {r['requests']} | {errs} | {r['tokens_per_s']} | {peer['tokens_per_s']} | "
                  f"{ratio:.2f} | {r['p50_s']} | {r['p99_s']} |")
        report.update(slow_clients=args.slow_clients, slow_levels=slow_results, health=health, base_health=base_health,
                      slow_held=held, slow_reopened=reopened)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
