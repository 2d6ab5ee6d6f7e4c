import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# `python -m pytest` from the repository root puts the root first on sys.path, where the folder kernels/
# (csps.kernels) shadows the PyPI package 'kernels' that transformers imports: take it off, for this process
# and the Python processes the tests start (`make test` sets PYTHONSAFEPATH itself).
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if p not in ("", _root)]
os.environ["PYTHONSAFEPATH"] = "1"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from csps.engine.tokenizer import Tokenizer, load_tokenizer

    return Tokenizer(load_tokenizer("smollm2"))
