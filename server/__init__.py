"""csps.server: the HTTP front end (``csps serve``).

An API process (FastAPI on uvicorn; no torch) talks msgpack over ZMQ to an engine process that owns
the engine (rank 0 of its SP × TP ranks):

- ``cli``: the ``serve`` subcommand; ``run``: bind, serve, drain on SIGTERM; ``config``: ServerConfig.
- ``app``: the FastAPI app, wiring and small endpoints; ``middleware``: API key, body limit, draining.
- ``openai_api``: /v1/completions and /v1/chat/completions; ``summarize_api`` + ``summarize``: /v1/summarize.
- ``llama_api`` + ``llama_protocol`` + ``llama_stops``: llama.cpp server's /infill and /completion; ``fim``:
  fill-in-the-middle templates from the vocabulary.
- ``protocol``: request schemas; ``errors``: OpenAI-shaped errors; ``http_io``: body parsing, SSE;
  ``sse_keepalive``: comment lines on silent streams; ``prompt_progress``: prefill progress.
- ``engine_client`` (API side) and ``engine_proc`` (engine side) over ``ipc``; ``metrics``: Prometheus.
"""
