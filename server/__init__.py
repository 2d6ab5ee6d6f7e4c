"""csps.server: the HTTP front end (``csps serve``).

An API process (FastAPI on uvicorn; no torch) talks msgpack over ZMQ to an engine process that owns
the engine (rank 0 of its SP × TP ranks):

- ``cli``: the ``serve`` subcommand; ``run``: bind, serve, drain on SIGTERM; ``config``: ServerConfig.
- ``app``: the FastAPI app, wiring and small endpoints; ``middleware``: API key, body limit, draining.
- ``openai_api``: /v1/completions and /v1/chat/completions; ``summarize_api`` + ``summarize``: /v1/summarize.
- ``protocol``: request schemas; ``errors``: OpenAI-shaped errors; ``http_io``: body parsing, SSE.
- ``engine_client`` (API side) and ``engine_proc`` (engine side) over ``ipc``; ``metrics``: Prometheus.
"""
