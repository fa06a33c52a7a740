"""Serving: an OpenAI-compatible API with continuous batching, and a web chat page (`kfoundry serve`).

    batch.py       per-row KV cache slots and the batched decode step (each row at its own position)
    sampling.py    per-row temperature / top-p / top-k / seed, sampled in one vectorised pass
    scheduler.py   the thread that owns the model: bounded queue, join/leave between decode steps
    textstream.py  token ids to text, piece by piece (whole characters only, stop strings)
    generation.py  the asyncio side of one request: events to text, timeout, cancellation
    schemas.py     request bodies and the OpenAI error shape
    app.py         the FastAPI app: /v1 endpoints, server-sent events, errors, the static page
    server.py      uvicorn in a background thread (tests, notebooks)
    smoke.py       a random-weight checkpoint for exercising the serving path
    cli.py         `kfoundry serve`

See docs/serve.md.
"""
