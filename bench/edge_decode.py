"""Edge decoding, all in one run on the same checkpoint: decode tokens/s at batch 1, file sizes, bits per byte.

Engines: our generator in float32 and with int8 weight-only matrices (kfoundry/model/quantize.py),
`transformers` `generate` on the exported Hugging Face model, and llama.cpp (through llama-cpp-python) on
F32 and Q8_0 GGUF exports. Greedy decoding of a fixed number of new tokens (no early stop) after a short
prompt; rounds alternate between engines so machine load affects all alike. The table shows each engine's best
round; the goal ratios are medians of per-round ratios (engines run back to back within a round share the
machine's load, which on a shared machine is steadier than a ratio of bests). Every engine gets the same number
of threads.

Bits per byte are measured on FLORES-200 dev sentences (Korean and English, from the shared data), which no
kfoundry model trains on, for our float32 and int8 models and for every GGUF type.

    .venv/bin/python bench/edge_decode.py --model RUN/ckpt/step-NNNNNN [--new-tokens 128] [--rounds 5] [--large gpu-124m]

Goals (issue 7): our generator >= 3x transformers and >= 0.5x llama.cpp F32.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
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
            for t in GGUF_TYPES}

    def run_ours(model):
        return lambda: generate(model, [prompt], SamplingParams(max_new_tokens=n))[0]

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_id)
        return out[0, len(prompt):].tolist()

    def run_llama(t):
        def run():
            llm, out = llms[t], []
            llm.reset()
            for tok_id in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
                out.append(int(tok_id))
                if len(out) == n:
                    break
            return out
        return run

    engines = {"kfoundry fp32": run_ours(fp32), "kfoundry int8": run_ours(int8), "transformers fp32": run_hf,
               "llama.cpp F32": run_llama("f32"), "llama.cpp Q8_0": run_llama("q8_0")}
    first = {name: fn() for name, fn in engines.items()}  # warm-up
    secs: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, fn in engines.items():
            # torch and llama.cpp each bring their own OpenMP runtime, whose idle threads spin for a while after
            # a parallel region; a pause lets the previous engine's threads go to sleep before the next one runs.
            time.sleep(0.5)
            t0 = time.perf_counter()
            out = fn()
            secs[name].append(time.perf_counter() - t0)
            assert len(out) == n, (name, len(out))
    tps = {name: n / min(s) for name, s in secs.items()}

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
    print("\n| engine | decode tokens/s | greedy tokens = kfoundry fp32 |\n|---|---|---|")
    for name in engines:
        print(f"| {name} | {tps[name]:,.0f} | {'yes' if same[name] else 'no'} |")
    def ratio(a: str, b: str) -> float:
        """Median over rounds of a's speed / b's speed within the same round (neighbours in time share the
        machine's load, so this is steadier than a ratio of bests on a busy machine)."""
        return float(np.median([sb / sa for sa, sb in zip(secs[a], secs[b])]))

    ratios = {"fp32 / transformers": ratio("kfoundry fp32", "transformers fp32"),
              "fp32 / llama.cpp F32": ratio("kfoundry fp32", "llama.cpp F32"),
              "int8 / fp32": ratio("kfoundry int8", "kfoundry fp32")}
    print(f"\nmedian per-round ratios: kfoundry fp32 / transformers = {ratios['fp32 / transformers']:.2f}x (goal >= 3x); "
          f"kfoundry fp32 / llama.cpp F32 = {ratios['fp32 / llama.cpp F32']:.2f}x (goal >= 0.5x); "
          f"kfoundry int8 / fp32 = {ratios['int8 / fp32']:.2f}x")
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
                                               "seconds": secs, "new_tokens": n,
                                               "threads": threads, "large": large}, indent=2), encoding="utf-8")


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
    main()
