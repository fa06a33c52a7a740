"""Serving: an OpenAI-compatible API with continuous batching, and a web chat page (`kfoundry serve`).

    batch.py       per-row KV cache slots and the batched decode step (each row at its own position)
    sampling.py    per-row temperature / top-p / top-k / seed, sampled in one vectorised pass
    scheduler.py   the thread that owns the model: bounded queue, join/leave between decode steps
    engine.py      the interface the app needs from a generation backend (the scheduler is one)
    engines/       the other engines: one forwarding engine over llama.cpp's llama-server or vLLM's OpenAI server
    textstream.py  token ids to text, piece by piece (whole characters only, stop strings)
    generation.py  the asyncio side of one request: events to text, timeout, cancellation, abort
    schemas.py     request and response bodies; refused and ignored OpenAI options
    plan.py        a request checked against the limits and turned into tokens and sampling settings
    openai_format.py  OpenAI's response JSON and stream chunks, as pure functions
    errors.py      APIError and OpenAI's error body
    guard.py       Host, API key, body size and time before the body is parsed; the SIGTERM drain
    hosts.py       loopback addresses and Host header names
    app.py         the FastAPI app: routes, error handlers, the static page
    server.py      uvicorn with a header timeout and a connection cap; foreground or a background thread
    smoke.py       a random-weight checkpoint for exercising the serving path

`kfoundry serve` itself is kfoundry/serve_cli.py, one level up: with the llama.cpp or vLLM engine it also exports
the checkpoint (GGUF, Hugging Face), and serve/ does not import export/.

See docs/serve.md.
"""
