"""Edge decoding, all in one run on the same checkpoint: decode tokens/s at batch 1, file sizes, bits per byte.

Engines: our generator in float32 and with int8 weight-only matrices (kfoundry/model/quantize.py),
`transformers` `generate` on the exported Hugging Face model, and llama.cpp (through llama-cpp-python) on
F32 and Q8_0 GGUF exports. Greedy decoding of a fixed number of new tokens (no early stop) after a short
prompt; rounds alternate between engines so machine load affects all alike. The table shows each engine's best
round; the goal ratios are medians of per-round ratios (engines run back to back within a round share the
machine's load, which on a shared machine is steadier than a ratio of bests). Every engine gets the same number
of threads.

llama.cpp runs in two builds, both from the same llama.cpp source (the one llama-cpp-python's source package
ships, so the Python binding matches it):

- *portable*: the library the Makefile installs (`-DGGML_NATIVE=OFF`: AVX2/FMA/F16C, runs on any x86-64 with them);
- *native*: the same source built for this machine (`-DGGML_NATIVE=ON`, llama.cpp's default, i.e.
  `-march=native`: AVX-512 where the CPU has it). This is what a user who builds llama.cpp gets, so it is the
  fair peer. It is built once into `--native-build DIR` (a temporary directory unless given; the source package
  comes from `--llama-src` or `pip download`), and loaded through `LLAMA_CPP_LIB_PATH`.

A process can load one llama.cpp library only, so each build decodes in its own worker process that stays up for
the whole run; the worker times its own decode loop, exactly as the in-process engines are timed. The output
states the CPU features each build uses (llama.cpp's system info) and the machine's load average before and after
the timed rounds, labelled idle or busy.

Bits per byte are measured on FLORES-200 dev sentences (Korean and English, from the shared data), which no
kfoundry model trains on, for our float32 and int8 models and for every GGUF type.

    .venv/bin/python bench/edge_decode.py --model RUN/ckpt/step-NNNNNN [--new-tokens 128] [--rounds 5] [--large gpu-124m]
        [--native-build DIR] [--llama-src DIR_OR_TARBALL]

Goals (issue 7): our generator >= 3x transformers and >= 0.5x llama.cpp F32 built for the machine (native).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from kfoundry.checkpoint import load_model, load_tokenizer
from kfoundry.export.gguf import GGUF_TYPES, export_gguf
from kfoundry.export.hf import export_hf
from kfoundry.model.generate import SamplingParams, generate
from kfoundry.model.quantize import model_bytes, quantize_int8
from kfoundry.text import nfc

ROOT = Path(__file__).resolve().parents[1]


def flores_lines(n: int) -> list[str]:
    base = Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data")) / "flores200" / "dev"
    lines = []
    for lang in ("kor_Hang", "eng_Latn"):
        lines += (base / f"{lang}.dev").read_text(encoding="utf-8").splitlines()[:n]
    return lines


def bits_per_byte(logits_of, docs: list[list[int]], token_bytes: np.ndarray) -> float:
    """Total nats over all predicted tokens / total bytes / ln 2 (special tokens count neither)."""
    nats = nbytes = 0.0
    for ids in docs:
        z = logits_of(ids[:-1]).astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        y = np.array(ids[1:])
        counted = token_bytes[y] > 0
        nats -= logp[np.arange(len(y)), y][counted].sum()
        nbytes += token_bytes[y][counted].sum()
    return float(nats / nbytes / math.log(2))


# ------------------------------------------------------------------------------------------------ llama.cpp builds

NATIVE_CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON",
                     "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                     "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]


def llama_source(src: str | None, work: Path) -> Path:
    """The llama.cpp source inside llama-cpp-python's source package, of the version installed here."""
    if src is None:
        want = version("llama-cpp-python")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"llama-cpp-python=={want}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(work)], check=True)
        src = str(next(work.glob("llama_cpp_python-*.tar.gz")))
    path = Path(src)
    if path.is_file():  # the .tar.gz itself
        with tarfile.open(path) as tar:
            tar.extractall(work, filter="data")
        path = next(p for p in work.iterdir() if p.is_dir() and p.name.startswith("llama_cpp_python-"))
    tree = path / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").is_file():
        raise FileNotFoundError(f"no llama.cpp source at {tree}")
    return tree


def build_native_llama(build_dir: Path, src: str | None) -> Path:
    """Build libllama for this machine (GGML_NATIVE=ON) into BUILD_DIR, or reuse a build already there; returns
    the directory holding libllama.so and its ggml libraries."""
    if not (build_dir / "CMakeCache.txt").is_file():
        tree = llama_source(src, Path(tempfile.mkdtemp(prefix="llama-src-")))
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(tree), "-B", str(build_dir), *generator, *NATIVE_CMAKE_ARGS], check=True,
                       stdout=subprocess.DEVNULL)
    cache = (build_dir / "CMakeCache.txt").read_text()
    if "GGML_NATIVE:BOOL=ON" not in cache:
        raise ValueError(f"{build_dir} is not a GGML_NATIVE=ON build")
    t0 = time.perf_counter()
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    print(f"native llama.cpp: {build_dir} (build step {time.perf_counter() - t0:.0f} s; 0 s means it was built "
          "before)", file=sys.stderr)
    lib = next((p.parent for p in build_dir.rglob("libllama.so")), None)
    if lib is None:
        raise FileNotFoundError(f"no libllama.so under {build_dir}")
    return lib


def llama_worker(config: str) -> None:
    """Worker process: load the GGUF files with the llama.cpp this process was started with, then decode on
    request (one JSON line in, one out), timing only the decode loop."""
    import llama_cpp

    cfg = json.loads(config)
    llms = {t: llama_cpp.Llama(model_path=path, n_ctx=cfg["n_ctx"], n_batch=cfg["n_ctx"], n_threads=cfg["threads"],
                               n_threads_batch=cfg["threads"], seed=0, verbose=False)
            for t, path in cfg["ggufs"].items()}
    print(json.dumps({"system_info": llama_cpp.llama_print_system_info().decode().strip(),
                      "lib": str(llama_cpp.llama_cpp._base_path)}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        llm, out = llms[req["type"]], []
        llm.reset()
        t0 = time.perf_counter()
        for tok_id in llm.generate(req["prompt"], temp=0.0, repeat_penalty=1.0):
            out.append(int(tok_id))
            if len(out) == req["n"]:
                break
        print(json.dumps({"tokens": out, "seconds": time.perf_counter() - t0}), flush=True)
    for llm in llms.values():
        llm.close()


class LlamaWorker:
    """One llama.cpp build in its own process (`lib_dir` None: the installed, portable one)."""

    def __init__(self, lib_dir: Path | None, ggufs: dict[str, Path], n_ctx: int, threads: int):
        env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
        if lib_dir is not None:
            env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
        config = json.dumps({"ggufs": {t: str(p) for t, p in ggufs.items()}, "n_ctx": n_ctx, "threads": threads})
        self.proc = subprocess.Popen([sys.executable, __file__, "--llama-worker", config], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.info = json.loads(self.proc.stdout.readline())

    def decode(self, t: str, prompt: list[int], n: int) -> tuple[list[int], float]:
        try:
            self.proc.stdin.write(json.dumps({"type": t, "prompt": prompt, "n": n}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:  # the worker died: say how (a build for another CPU dies of SIGILL)
            rc = self.proc.wait(timeout=60)
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
            raise RuntimeError(f"llama.cpp worker {how}")
        reply = json.loads(line)
        return reply["tokens"], reply["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


class OtherLoad:
    """How many CPUs' worth of work *other* processes did while the benchmark ran: the machine's busy time
    (/proc/stat) minus this process's and its workers' own CPU time, over the wall time. The load average cannot
    say this, because it counts the benchmark's own threads."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> int:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    def _own(self) -> int:
        total = 0
        for pid in ["self", *self.pids]:
            stat = Path(f"/proc/{pid}/stat").read_text()
            total += sum(int(x) for x in stat[stat.rindex(")") + 2:].split()[11:13])  # utime, stime
        return total

    def cpus(self) -> float:
        ticks = os.sysconf("SC_CLK_TCK") * (time.perf_counter() - self.t0)
        return max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0)) / ticks


# ------------------------------------------------------------------------------------------------ the benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--prompt", default="대한민국은")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--large", default=None, metavar="PRESET",
                    help="also time fp32 vs int8 decoding on a random-weight model of this preset's shape "
                         "(e.g. gpu-124m), where the weights no longer fit in the CPU caches")
    ap.add_argument("--bpb-lines", type=int, default=100, help="FLORES dev lines per language for bits per byte")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--native-build", default=None, metavar="DIR",
                    help="build directory for llama.cpp with GGML_NATIVE=ON (reused when it holds a build; "
                         "default: a new temporary directory)")
    ap.add_argument("--llama-src", default=None, metavar="PATH",
                    help="llama-cpp-python's source package (.tar.gz or unpacked) for the native build "
                         "(default: pip download of the installed version)")
    args = ap.parse_args()
    import llama_cpp
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    ckpt = Path(args.model)
    tok = load_tokenizer(ckpt)
    fp32 = load_model(ckpt).eval()
    int8 = quantize_int8(copy.deepcopy(fp32))
    cfg = fp32.cfg
    prompt = tok.encode(nfc(args.prompt), bos=True)
    n = min(args.new_tokens, cfg.max_seq_len - len(prompt))

    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    hf_dir = export_hf(ckpt, work / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    ggufs = {t: export_gguf(ckpt, work / f"model-{t}.gguf", out_type=t) for t in GGUF_TYPES}
    llms = {t: llama_cpp.Llama(model_path=str(ggufs[t].path), n_ctx=cfg.max_seq_len, n_batch=cfg.max_seq_len,
                               n_threads=threads, n_threads_batch=threads, logits_all=True, seed=0, verbose=False)
            for t in GGUF_TYPES}  # bits per byte (portable build, in this process)
    native_lib = build_native_llama(Path(args.native_build or tempfile.mkdtemp(prefix="llama-native-")),
                                    args.llama_src)
    # One worker per build and file type, so that a crash (a native build using an instruction this machine's
    # virtualisation does not allow) takes down only that engine, and is reported as such.
    workers = {(build, t): LlamaWorker(lib, {t: ggufs[t].path}, cfg.max_seq_len, threads)
               for build, lib in (("native", native_lib), ("portable", None)) for t in ("f32", "q8_0")}

    def run_ours(model):
        return lambda: generate(model, [prompt], SamplingParams(max_new_tokens=n))[0]

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_id)
        return out[0, len(prompt):].tolist()

    def timed_here(fn):
        def run():
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0
        return run

    def run_llama(build, t):
        return lambda: workers[build, t].decode(t, prompt, n)  # timed inside the worker

    engines = {"kfoundry fp32": timed_here(run_ours(fp32)), "kfoundry int8": timed_here(run_ours(int8)),
               "transformers fp32": timed_here(run_hf)}
    for build in ("native", "portable"):
        engines[f"llama.cpp F32 ({build})"] = run_llama(build, "f32")
        engines[f"llama.cpp Q8_0 ({build})"] = run_llama(build, "q8_0")
    first, failed = {}, {}
    for name, fn in list(engines.items()):  # warm-up, and which engines run at all
        try:
            first[name] = fn()[0]
        except RuntimeError as e:
            failed[name] = str(e)
            del engines[name]
    secs: dict[str, list[float]] = {name: [] for name in engines}
    load_before = os.getloadavg()[0]
    other = OtherLoad([w.proc.pid for w in workers.values() if w.proc.poll() is None])
    for _ in range(args.rounds):
        for name, fn in engines.items():
            # torch and llama.cpp each bring their own OpenMP runtime, whose idle threads spin for a while after
            # a parallel region; a pause lets the previous engine's threads go to sleep before the next one runs.
            time.sleep(0.5)
            out, seconds = fn()
            secs[name].append(seconds)
            assert len(out) == n, (name, len(out))
    other_cpus, load_after = other.cpus(), os.getloadavg()[0]
    label = "idle" if other_cpus < 0.25 else "busy"  # busy: other processes used more than a quarter of a CPU
    tps = {name: n / min(s) for name, s in secs.items()}
    for w in workers.values():
        w.close()

    token_bytes = np.array(tok.token_bytes())
    docs = [tok.encode(line, bos=True)[: cfg.max_seq_len + 1] for line in flores_lines(args.bpb_lines)]

    def torch_logits(model):
        def f(ids):
            with torch.inference_mode():
                return model(torch.tensor([ids]))[0].float().numpy()
        return f

    def llama_logits(t):
        def f(ids):
            llms[t].reset()
            llms[t].eval(ids)
            return np.array(llms[t].scores[: len(ids)])
        return f

    bpb = {"kfoundry fp32": bits_per_byte(torch_logits(fp32), docs, token_bytes),
           "kfoundry int8": bits_per_byte(torch_logits(int8), docs, token_bytes)}
    for t in GGUF_TYPES:
        bpb[f"llama.cpp {t.upper()}"] = bits_per_byte(llama_logits(t), docs, token_bytes)
    sizes = {"checkpoint model.safetensors (fp32)": (ckpt / "model.safetensors").stat().st_size,
             "kfoundry int8 in memory": model_bytes(int8)}
    sizes.update({f"GGUF {t.upper()}": ggufs[t].size_bytes for t in GGUF_TYPES})
    same = {name: out == first["kfoundry fp32"] for name, out in first.items()}

    print(f"model: {ckpt} ({fp32.num_params():,} parameters; dim {cfg.dim}, {cfg.n_layers} layers, "
          f"vocab {cfg.vocab_size}); {n} new tokens after a {len(prompt)}-token prompt; {threads} threads; "
          f"llama-cpp-python {llama_cpp.__version__}; torch {torch.__version__}")
    print(f"machine: {os.cpu_count()} CPUs; during the timed rounds other processes used {other_cpus:.2f} CPUs on "
          f"average: {label.upper()} (1-minute load average {load_before:.2f} before, {load_after:.2f} after, "
          f"counting this benchmark's own threads)")
    for (build, t), w in workers.items():
        if t == "f32":
            print(f"llama.cpp {build} build ({w.info['lib']}): {w.info['system_info']}")
    for name, why in failed.items():
        print(f"{name}: FAILED, not timed ({why})")
    print("\n| engine | decode tokens/s | greedy tokens = kfoundry fp32 |\n|---|---|---|")
    for name in engines:
        print(f"| {name} | {tps[name]:,.0f} | {'yes' if same[name] else 'no'} |")
    def ratio(a: str, b: str) -> float:
        """Median over rounds of a's speed / b's speed within the same round (neighbours in time share the
        machine's load, so this is steadier than a ratio of bests on a busy machine)."""
        return float(np.median([sb / sa for sa, sb in zip(secs[a], secs[b])]))

    ratios = {"fp32 / transformers": ratio("kfoundry fp32", "transformers fp32"),
              "fp32 / llama.cpp F32 (native)": ratio("kfoundry fp32", "llama.cpp F32 (native)"),
              "fp32 / llama.cpp F32 (portable)": ratio("kfoundry fp32", "llama.cpp F32 (portable)"),
              "llama.cpp F32 native / portable": ratio("llama.cpp F32 (native)", "llama.cpp F32 (portable)"),
              "int8 / fp32": ratio("kfoundry int8", "kfoundry fp32")}
    print(f"\nmedian per-round ratios ({label} machine): kfoundry fp32 / transformers = "
          f"{ratios['fp32 / transformers']:.2f}x (goal >= 3x); kfoundry fp32 / llama.cpp F32 native = "
          f"{ratios['fp32 / llama.cpp F32 (native)']:.2f}x (goal >= 0.5x; portable build: "
          f"{ratios['fp32 / llama.cpp F32 (portable)']:.2f}x); llama.cpp F32 native / portable = "
          f"{ratios['llama.cpp F32 native / portable']:.2f}x; kfoundry int8 / fp32 = {ratios['int8 / fp32']:.2f}x")
    print("\n| format | size (MB) |\n|---|---|")
    for name, b in sizes.items():
        print(f"| {name} | {b / 1e6:.3f} |")
    print(f"\n| format | bits/byte on FLORES dev ({len(docs)} lines, ko+en) | vs kfoundry fp32 |\n|---|---|---|")
    for name, v in bpb.items():
        print(f"| {name} | {v:.4f} | {(v / bpb['kfoundry fp32'] - 1) * 100:+.2f}% |")
    for llm in llms.values():
        llm.close()  # free llama.cpp's memory now (and avoid its noisy destructor at interpreter exit)
    large = large_model_int8(args.large, args.rounds) if args.large else None
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens_per_sec": tps, "ratios": ratios, "bpb": bpb, "sizes": sizes,
                                               "seconds": secs, "new_tokens": n, "threads": threads,
                                               "load": {"other_cpus": other_cpus, "label": label,
                                                        "loadavg_before": load_before,
                                                        "loadavg_after": load_after},
                                               "llama_cpp_builds": {b: w.info for (b, t), w in workers.items()
                                                                    if t == "f32"},
                                               "failed": failed,
                                               "large": large}, indent=2), encoding="utf-8")


def large_model_int8(preset_name: str, rounds: int, new_tokens: int = 32) -> dict:
    """fp32 vs int8 decode tokens/s of our generator on a random-weight model of a preset's shape."""
    from kfoundry.config import preset
    from kfoundry.model.llama import Transformer

    cfg = preset(preset_name).model
    fp32 = Transformer.build(cfg, seed=0).eval()
    int8 = quantize_int8(copy.deepcopy(fp32))
    prompt = [0] + list(range(100, 107))
    runs = {name: (lambda m=m: generate(m, [prompt], SamplingParams(max_new_tokens=new_tokens)))
            for name, m in (("fp32", fp32), ("int8", int8))}
    secs: dict[str, list[float]] = {name: [] for name in runs}
    for name, fn in runs.items():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            secs[name].append(time.perf_counter() - t0)
    out = {"preset": preset_name, "params": fp32.num_params(), "fp32_MB": model_bytes(fp32) / 1e6,
           "int8_MB": model_bytes(int8) / 1e6, **{f"{k}_tokens_per_sec": new_tokens / min(v) for k, v in secs.items()}}
    print(f"\n{preset_name} shape, random weights ({out['params']:,} parameters): fp32 {out['fp32_MB']:.0f} MB "
          f"{out['fp32_tokens_per_sec']:.1f} tokens/s; int8 {out['int8_MB']:.0f} MB {out['int8_tokens_per_sec']:.1f} "
          f"tokens/s; int8 / fp32 = {out['int8_tokens_per_sec'] / out['fp32_tokens_per_sec']:.2f}x")
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--llama-worker":
        llama_worker(sys.argv[2])
    else:
        main()
