import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from csps.engine.tokenizer import Tokenizer, load_tokenizer

    return Tokenizer(load_tokenizer("smollm2"))
