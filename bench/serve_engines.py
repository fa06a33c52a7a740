"""Engines side by side: our torch engine, our front over llama.cpp, and llama-server called directly.

    python bench/serve_engines.py                        # random ~26M-parameter model, 1/8/16 clients
    python bench/serve_engines.py --shape cpu-tiny       # the cpu-tiny preset's shape
    python bench/serve_engines.py --shape 25m,cpu-tiny   # both, one after the other, in one run
    python bench/serve_engines.py --model CKPT           # a checkpoint of yours
    python bench/serve_engines.py --decode-steps         # only the torch engine's decode step, before and after
    python bench/serve_engines.py --rounds 3             # each level 3 times, order flipped: median ratios

Three servers on loopback, the same model (the checkpoint, and its GGUF F32 export for llama.cpp) and the same
requests (/v1/completions, greedy, `--max-tokens` tokens, Korean and English prompts):

    torch        `kfoundry serve --engine torch`        our API, our continuous-batching scheduler
    llama.cpp    `kfoundry serve --engine llama.cpp`    our API in front of llama.cpp's llama-server
    direct       `llama-server` alone                   llama.cpp's own OpenAI-compatible API (the peer)

All three start before any measurement and stay idle between turns; for each client count they take turns
(torch, llama.cpp, direct; with `--rounds N`, N turns each, the order reversed every other round), so the
figures of a row share the machine's load of that moment. Each client sends its next request when the
previous one is answered. Both llama-servers get `--max-batch` slots; every server gets `--threads` threads.
Reported: generated tokens/s (from each answer's `usage`), p50 latency, and the ratios torch / direct and
llama.cpp / direct (with several rounds: the median over rounds of tokens/s, and the median of the per-round
ratios), with the load average before and after (the machine may be shared).

Also reported, because it does not depend on the load: the CPU time each server process spent per request
(from /proc, Linux): our front's Python (`kfoundry serve --engine llama.cpp` itself), the llama-server behind
it, and the llama-server called directly. On a 2-core machine the front's CPU is taken from the upstream's,
and an upstream that spends more per request (re-evaluating prompts, say) shows it here.
Goals: llama.cpp engine >= 0.9x direct; torch engine >= 0.5x direct at 8 clients on the ~25M model.

The default model has random weights with a BPE tokenizer of 8,192 tokens trained on a slice of the shared
data (so every id the model can produce decodes); speed does not depend on the weights. Nothing leaves the
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kfoundry.serve.engines.llama_server import LlamaServer, free_port

PROMPTS = [
    "대한민국 헌법 제1조는", "The capital of Korea is", "오늘 날씨가 좋아서", "언어 모델은 다음 토큰을",
    "In 2026, the price was", "서울에서 부산까지", "Once upon a time", "점심으로 김치찌개를 먹고 😀",
]
SHAPES = {  # name: (dim, layers, heads, kv heads, ffn, vocab)
    "25m": (512, 8, 8, 4, 1280, 8192),  # 26.2M parameters with the tied 8,192-token embedding
    "cpu-tiny": (192, 4, 6, 2, 512, 4096),  # kfoundry.config PRESETS["cpu-tiny"]: 3.0M parameters
}


def build_checkpoint(out: Path, shape: str) -> Path:
    """A random-weight checkpoint of `shape` whose tokenizer fills the whole vocabulary."""
    import gzip

    from kfoundry.checkpoint import save_checkpoint
    from kfoundry.config import ModelConfig
    from kfoundry.model.llama import Transformer
    from kfoundry.tokenizer import train_tokenizer

    dim, layers, heads, kv, ffn, vocab = SHAPES[shape]
    shared = Path(os.environ.get("KFOUNDRY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    texts = (shared / "flores200/dev/kor_Hang.dev").read_text().splitlines()
    texts += (shared / "flores200/dev/eng_Latn.dev").read_text().splitlines()
    with gzip.open(shared / "ko/nsmc/reviews.jsonl.gz", "rt") as f:
        texts += [json.loads(next(f))["text"] for _ in range(20000)]
    tok = train_tokenizer(texts, vocab)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn,
                      max_seq_len=512, tie_embeddings=True)
    return save_checkpoint(out, Transformer.build(cfg, seed=0), tok, meta={"stage": "random-init"})


def decode_steps(shape: str, threads: int, reps: int) -> None:
    """Time one batched decode step at 1, 8 and 16 rows: the model's own forward with a slot cache (GenericSlots,
    what the torch engine ran before) against the prepared path (PreparedSlots), interleaved, same weights."""
    import torch

    from kfoundry.config import ModelConfig
    from kfoundry.model.llama import Transformer
    from kfoundry.serve.batch import GenericSlots, PreparedSlots

    torch.set_num_threads(threads)
    dim, layers, heads, kv, ffn, vocab = SHAPES[shape]
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn,
                      max_seq_len=512, tie_embeddings=True)
    model = Transformer.build(cfg, seed=0).eval()
    for rows in (1, 8, 16):
        paths = {cls.__name__: cls(model, 16, 512) for cls in (GenericSlots, PreparedSlots)}
        best = {name: float("inf") for name in paths}
        with torch.inference_mode():
            for s in paths.values():
                for i in range(rows):
                    s.prefill(i, list(range(1, 20 + i)))
            tok = torch.ones(rows, dtype=torch.long)  # each step advances both paths' slots alike
            for _ in range(5):  # alternate the two, best of 5 rounds: the fairest figure on a shared machine
                for name, s in paths.items():
                    t = time.perf_counter()
                    for _ in range(reps):
                        s.step(tok)
                    best[name] = min(best[name], (time.perf_counter() - t) / reps * 1e3)
        g, p = best["GenericSlots"], best["PreparedSlots"]
        print(f"| {shape} | {rows} | {g:.2f} | {p:.2f} | {g / p:.2f}x |", flush=True)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} not ready after {timeout} s")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid`, all its threads (Linux /proc; None elsewhere or when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def child_pid(parent: int, name: str) -> int | None:
    """The pid of `parent`'s child process called `name` (the llama-server behind our front), or None."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if comm.split("(", 1)[1] == name[:15] and int(rest.split()[1]) == parent:
            return int(stat.parent.name)
    return None


def start_front(engine: str, ckpt: Path, gguf: Path, args) -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "kfoundry", "serve", "--model", str(ckpt), "--engine", engine, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "64", "--model-name", "bench", "--log-level", "warning",
           "--threads", str(args.threads)]
    if engine == "llama.cpp":
        cmd += ["--gguf", str(gguf)]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return url, proc


async def drive(url: str, clients: int, n_requests: int, max_tokens: int) -> dict:
    """`clients` loops share `n_requests` requests; tokens/s from the answers' usage, latency per request."""
    latencies: list[float] = []
    tokens = errors = 0
    next_index = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index, tokens, errors
        while next_index < n_requests:
            i = next_index
            next_index += 1
            body = {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0}
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"tokens_per_s": round(tokens / wall, 1), "p50_s": round(statistics.median(latencies), 4) if latencies
            else None, "tokens": tokens, "errors": errors, "wall_s": round(wall, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: random weights of --shape)")
    ap.add_argument("--shape", default="25m", help=f"one of {', '.join(SHAPES)}, or several joined by commas")
    ap.add_argument("--clients", default="1,8,16")
    ap.add_argument("--requests", type=int, default=48, help="requests per engine and client count")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16, help="torch batch rows = llama.cpp slots")
    ap.add_argument("--threads", type=int, default=2, help="threads of every server")
    ap.add_argument("--rounds", type=int, default=1,
                    help="turns of each server per client count (order reversed every other round)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--decode-steps", action="store_true", help="only time the torch decode step (no servers)")
    args = ap.parse_args()
    if args.decode_steps:
        print("| shape | rows | general forward (ms/step) | prepared step (ms/step) | speedup |")
        print("|---|---:|---:|---:|---:|")
        for shape in ("cpu-tiny", "25m"):
            decode_steps(shape, args.threads, reps=20)
        print(f"threads {args.threads}; load average {os.getloadavg()[0]:.2f}")
        return 0
    levels = [int(c) for c in args.clients.split(",")]
    shapes = [x for x in args.shape.split(",") if x]
    unknown = [x for x in shapes if x not in SHAPES]
    if unknown or (args.model and len(shapes) > 1):
        ap.error(f"--shape: choose from {', '.join(SHAPES)} (one shape with --model); got {args.shape}")
    results = {shape: run_shape(shape, levels, args) for shape in shapes}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def run_shape(shape: str, levels: list[int], args) -> dict:
    """Start the three servers on one model of `shape` (or --model), drive them in turns, print the table."""
    from kfoundry.checkpoint import load_config, load_model
    from kfoundry.export.gguf import export_gguf

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.model or build_checkpoint(Path(tmp) / "ckpt", shape)
        gguf = export_gguf(ckpt, Path(tmp) / "model-f32.gguf", out_type="f32").path
        n_params = load_model(ckpt).num_params()
        ctx = load_config(ckpt).max_seq_len
        procs: list = []
        try:
            urls, pids = {}, {}
            for engine in ("torch", "llama.cpp"):
                urls[engine], proc = start_front(engine, ckpt, gguf, args)
                procs.append(proc)
                pids[engine] = proc.pid
            pids["llama.cpp upstream"] = child_pid(pids["llama.cpp"], "llama-server")
            direct = LlamaServer(gguf, slots=args.max_batch, ctx=ctx, threads=args.threads).start()
            procs.append(direct)
            urls["direct"], pids["direct"] = direct.url, direct.proc.pid
            for url in urls.values():  # warm-up: first-call allocations, not measured
                asyncio.run(drive(url, 2, 4, 8))
            rows = []
            for clients in levels:
                rounds = []
                for r in range(args.rounds):
                    names = list(urls) if r % 2 == 0 else list(reversed(urls))
                    turn = {}
                    for name in names:
                        before = {k: cpu_seconds(pid) for k, pid in pids.items() if pid}
                        turn[name] = asyncio.run(drive(urls[name], clients, args.requests, args.max_tokens))
                        # the processes that served this turn: "llama.cpp" is our front and its upstream
                        turn[name]["cpu_ms_per_request"] = {
                            k: round((cpu_seconds(pid) - before[k]) * 1e3 / args.requests, 2)
                            for k, pid in pids.items() if k.startswith(name) and before.get(k) is not None}
                    turn["load"] = round(os.getloadavg()[0], 2)
                    rounds.append(turn)
                    print(json.dumps({"clients": clients, "round": r, **turn}), file=sys.stderr, flush=True)
                rows.append(summarize(clients, rounds))
        finally:
            for p in procs:
                if isinstance(p, LlamaServer):
                    p.close()
                else:
                    p.terminate()
                    p.wait(30)

    load = os.getloadavg()
    print(f"model: {args.model or f'random weights, shape {shape}'} ({n_params / 1e6:.1f}M parameters); "
          f"{args.requests} requests of {args.max_tokens} tokens per engine and level, greedy; torch batch = "
          f"llama.cpp slots = {args.max_batch}; {args.threads} threads per server; {os.cpu_count()} CPUs; "
          f"load average before {load_before[0]:.2f} / {load_before[1]:.2f}, after {load[0]:.2f} / {load[1]:.2f}")
    print()
    if args.rounds > 1:
        print(f"{args.rounds} rounds per level: medians of tokens/s and p50, and medians of the per-round ratios")
        print()
    print("| clients | torch tok/s (p50 s) | llama.cpp engine tok/s (p50 s) | llama-server direct tok/s (p50 s) | "
          "torch / direct | llama.cpp engine / direct |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t, l, d = r["torch"], r["llama.cpp"], r["direct"]
        cell = lambda x: f"{x['tokens_per_s']:,.0f} ({x['p50_s']})" + (f", {x['errors']} errors" if x["errors"] else "")
        print(f"| {r['clients']} | {cell(t)} | {cell(l)} | {cell(d)} | {r['torch_vs_direct']:.2f}x | "
              f"{r['llama.cpp_vs_direct']:.2f}x |")
    print()
    print("CPU milliseconds per request, each server process (median of rounds):")
    print()
    print("| clients | torch server | our front (Python) | llama-server behind it | llama-server direct |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        c = r["cpu_ms_per_request"]
        fmt = lambda k: "—" if c.get(k) is None else f"{c[k]:.1f}"
        print(f"| {r['clients']} | {fmt('torch')} | {fmt('llama.cpp')} | {fmt('llama.cpp upstream')} | "
              f"{fmt('direct')} |")
    print(flush=True)
    return {"levels": rows, "params": n_params, "load_before": load_before, "load_after": load}


def summarize(clients: int, rounds: list[dict]) -> dict:
    """One row from a level's rounds: the median of each server's figures, the median of the per-round ratios
    against direct (the ratio of one round shares that round's load), and the median CPU per request."""
    med = lambda xs: round(statistics.median(xs), 4)  # noqa: E731
    row: dict = {"clients": clients, "rounds": rounds}
    for name in ("torch", "llama.cpp", "direct"):
        runs = [r[name] for r in rounds]
        row[name] = {"tokens_per_s": med([x["tokens_per_s"] for x in runs]),
                     "p50_s": med([x["p50_s"] for x in runs if x["p50_s"] is not None] or [float("nan")]),
                     "errors": sum(x["errors"] for x in runs)}
        row[f"{name}_vs_direct"] = med([r[name]["tokens_per_s"] / r["direct"]["tokens_per_s"] for r in rounds])
    cpu = {}
    for r in rounds:
        for name in ("torch", "llama.cpp", "direct"):
            for k, v in r[name].get("cpu_ms_per_request", {}).items():
                cpu.setdefault(k, []).append(v)
    row["cpu_ms_per_request"] = {k: med(v) for k, v in cpu.items()}
    return row


if __name__ == "__main__":
    sys.exit(main())
