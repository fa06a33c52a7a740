"""Benchmark: tokens per character of well-known tokenizers on FLORES-200 dev, measured here, offline.

The peers' tokenizer files cannot be fetched without the Hugging Face hub, but llama.cpp ships vocabulary-only
GGUF files of many of them (`vendor/llama.cpp/models/ggml-vocab-*.gguf` in llama-cpp-python's source package),
made from the Hugging Face repositories that `convert_hf_to_gguf_update.py` names, and checked by llama.cpp's own
tests against the Hugging Face tokenizers (the `.inp`/`.out` files beside them). This script loads each one with
llama.cpp (`vocab_only`), encodes every FLORES dev sentence on its own, without BOS/EOS, exactly as
`bench/tokenizer_efficiency.py` encodes ours, and prints tokens per character (NFC characters).

    .venv/bin/python bench/peer_tokenizers.py [--llama-src PATH]   # PATH: the sdist (.tar.gz or unpacked)

Without --llama-src the source package of the installed llama-cpp-python version is fetched with `pip download`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from edge_decode import llama_source  # same folder: llama-cpp-python's source package, unpacked

from kfoundry.text import nfc
from kfoundry.tokenizer.cli import flores_texts

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data"))

# name -> (vocabulary file, the Hugging Face repository it was made from, per convert_hf_to_gguf_update.py)
PEERS = {
    "GPT-2 (50k)": ("ggml-vocab-gpt-2.gguf", "openai-community/gpt2"),
    "Llama-2 (32k)": ("ggml-vocab-llama-spm.gguf", "meta-llama/Llama-2-7b-hf"),
    "Llama-3 (128k)": ("ggml-vocab-llama-bpe.gguf", "meta-llama/Meta-Llama-3-8B"),
    "Qwen1.5 (152k)": ("ggml-vocab-qwen2.gguf", "Qwen/Qwen1.5-7B"),
}


def tokens_per_char(llm, texts: list[str]) -> float:
    texts = [nfc(t) for t in texts]
    tokens = sum(len(llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)) for t in texts)
    return tokens / sum(len(t) for t in texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-src", default=None, help="llama-cpp-python's source package (.tar.gz or unpacked)")
    ap.add_argument("--flores", default=str(SHARED / "flores200" / "dev"))
    args = ap.parse_args()
    import llama_cpp

    models = llama_source(args.llama_src, Path(tempfile.mkdtemp(prefix="llama-src-"))) / "models"
    texts = flores_texts(Path(args.flores))
    print(f"FLORES-200 dev: {len(texts['ko'])} Korean and {len(texts['en'])} English sentences; "
          f"llama-cpp-python {llama_cpp.__version__}")
    print("\n| tokenizer | Korean tokens / char | English tokens / char | vocabulary file (from) |\n|---|---:|---:|---|")
    for name, (file, repo) in PEERS.items():
        llm = llama_cpp.Llama(model_path=str(models / file), vocab_only=True, verbose=False)
        ko, en = tokens_per_char(llm, texts["ko"]), tokens_per_char(llm, texts["en"])
        print(f"| {name} | {ko:.3f} | {en:.3f} | `{file}` ({repo}) |")
        llm.close()


if __name__ == "__main__":
    main()
