"""Engines behind kfoundry's front: who runs the model while the API, key, limits, errors, /health and the
chat page stay ours (kfoundry/serve/app.py).

    torch       our own continuous-batching scheduler (kfoundry/serve/scheduler.py) on the checkpoint itself
    llama.cpp   llama.cpp's `llama-server` on a GGUF export, with one slot per batch row (llama_cpp.py);
                the binary is built by scripts/build_llama_server.sh (llama_server.py finds and runs it)
    vllm        vLLM's OpenAI server on the Hugging Face export, on GPUs (vllm.py)

The interface an engine honours is `kfoundry.serve.engine.Engine` (submit tickets, report token ids through
each ticket's `on_events`), so text decoding, stop strings, `n` choices, usage and error shapes are the
front's work and the same whatever runs the model. llama.cpp and vLLM are one forwarding engine
(forward.py) over two upstream servers (process.py runs either as a child process); they differ only in
how the server is started and in its request dialect.
"""

ENGINES = ("torch", "llama.cpp", "vllm")
