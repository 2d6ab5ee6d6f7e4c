"""Incremental detokenization: the streamed deltas add up to the full decode, multi-byte characters
included, while each token decodes only a short window."""

import pytest

from csps.engine.tokenizer import IncrementalDetokenizer


@pytest.mark.parametrize("text", [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune...",
    "naïve café — 東京タワー 🗼🚀 emoji and\n\n  indented   spaces\tand tabs",
    "def f(x):\n    return x ** 2  # ünïcödé\n",
])
def test_deltas_add_up_to_the_full_decode(smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text)
    detok = IncrementalDetokenizer(smollm2_tokenizer)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == smollm2_tokenizer.decode(ids) == detok.text
    assert all("\ufffd" not in d for d in deltas)
    assert detok.read_offset - detok.prefix_offset <= 8  # the decoded window stays short


def test_window_stays_short_over_a_long_output(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("word " * 3000)
    detok = IncrementalDetokenizer(smollm2_tokenizer)
    widths = []
    for t in ids:
        detok.add(t)
        widths.append(len(detok.ids) - detok.prefix_offset)
    assert max(widths) <= 4 and detok.text == smollm2_tokenizer.decode(ids)
