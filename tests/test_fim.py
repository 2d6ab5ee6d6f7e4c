"""FIM templates chosen from a tokenizer's vocabulary, and the prompts they build (constructed vocabularies:
each test tokenizer maps a character to one id, so a prompt's ids spell out its layout)."""

import pytest

from csps.server import fim

BASE = 1000  # ids of plain characters: BASE + ord(ch)


def vocab_of(*specials: str, start: int = 1) -> dict[str, int]:
    return {tok: start + i for i, tok in enumerate(specials)}


def encode(text: str) -> list[int]:
    return [BASE + ord(c) for c in text]


def spell(ids: list[int], vocab: dict[str, int], bos: int | None = None) -> str:
    """ids back to text, special tokens as their names (the test's detokenizer)."""
    names = {i: s for s, i in vocab.items()}
    return "".join("<BOS>" if i == bos else names[i] if i in names else chr(i - BASE) for i in ids)


QWEN = vocab_of("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>", "<|im_start|>")
STARCODER = vocab_of("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
                     "<filename>", "<gh_stars>", "<repo_name>", "<file_sep>")
DEEPSEEK = vocab_of("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>",
                    "<｜fim▁end｜>", "<|EOT|>", start=32000)
CODELLAMA = vocab_of("<unk>", "<s>", "</s>", start=0) | vocab_of("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>", start=32007)
SMOLLM2 = vocab_of("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                   "<filename>", start=0)  # SmolLM2 has StarCoder2's repository tokens but no FIM tokens


@pytest.mark.parametrize("vocab,name", [(QWEN, "qwen"), (STARCODER, "starcoder"), (DEEPSEEK, "deepseek"),
                                        (CODELLAMA, "codellama"), (SMOLLM2, None), ({"a": 1}, None)])
def test_the_template_is_detected_from_the_vocabulary(vocab, name):
    got = fim.choose(vocab, bos_id=None)
    assert (got.name if got else None) == name
    if got is not None:
        assert got.missing == []  # detected: every marker is a token


def test_plain_fim_prompts_of_each_template():
    def build(vocab, name=fim.AUTO, bos=None):
        f = fim.choose(vocab, bos, name)
        return spell(f.prompt(encode, "def f(", "):\n", middle="x"), vocab, bos)

    assert build(QWEN) == "<|fim_prefix|>def f(<|fim_suffix|>):\n<|fim_middle|>x"
    assert build(STARCODER) == "<fim_prefix>def f(<fim_suffix>):\n<fim_middle>x"
    bos = DEEPSEEK["<｜begin▁of▁sentence｜>"]
    assert build(DEEPSEEK, bos=bos) == "<BOS><｜fim▁begin｜>def f(<｜fim▁hole｜>):\n<｜fim▁end｜>x"
    assert build(CODELLAMA, bos=CODELLAMA["<s>"]) == "<BOS>▁<PRE>def f(▁<SUF>):\n▁<MID>x"


def test_repository_level_prompts_follow_each_models_training_layout():
    extra = [("src/a.py", "A = 1"), ("src/b.py", "B = 2\n")]
    q = fim.choose(QWEN, None)
    assert spell(q.prompt(encode, "pre", "suf", extra=extra), QWEN) == (
        "<|repo_name|>myproject\n<|file_sep|>src/a.py\nA = 1\n<|file_sep|>src/b.py\nB = 2\n"
        "<|file_sep|>filename\n<|fim_prefix|>pre<|fim_suffix|>suf<|fim_middle|>")
    s = fim.choose(STARCODER, None)
    assert spell(s.prompt(encode, "pre", "suf", extra=extra), STARCODER) == (
        "<repo_name>myproject<file_sep>src/a.py\nA = 1\n<file_sep>src/b.py\nB = 2\n"
        "<file_sep><fim_prefix>filename\npre<fim_suffix>suf<fim_middle>")
    # no file separator tokens: the files are plain text before the FIM prefix
    d = fim.choose(DEEPSEEK, None)
    assert spell(d.prompt(encode, "pre", "suf", extra=extra), DEEPSEEK) == (
        "--- src/a.py ---\nA = 1\n--- src/b.py ---\nB = 2\n<｜fim▁begin｜>pre<｜fim▁hole｜>suf<｜fim▁end｜>")


def test_a_repeated_context_gives_the_same_leading_tokens_whatever_the_cursor():
    q = fim.choose(QWEN, None)
    extra = [("lib.py", "x = 1\n" * 50)]
    a = q.prompt(encode, "def f(", ")", extra=extra)
    b = q.prompt(encode, "class G:\n    pass", "", middle="y", extra=extra)
    head = q.prompt(encode, "", "", extra=extra)[:-3]  # up to the FIM prefix marker
    assert a[:len(head)] == b[:len(head)] == head and len(head) > 300


def test_stop_tokens_are_the_templates_markers_and_end_tokens():
    q = fim.choose(QWEN, None)
    names = {i: s for s, i in QWEN.items()}
    assert sorted(names[i] for i in q.stop_token_ids) == sorted(
        ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>", "<|file_sep|>", "<|endoftext|>",
         "<|fim_pad|>"])
    assert QWEN["<|im_start|>"] not in q.stop_token_ids


def test_a_forced_template_tokenizes_missing_markers_as_text():
    f = fim.choose(SMOLLM2, None, "starcoder")
    assert f.name == "starcoder" and f.missing == ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]
    ids = f.prompt(encode, "a", "b", extra=[("x.py", "y")])
    # the repository tokens SmolLM2 does have are used as tokens; the FIM markers become characters
    assert spell(ids, SMOLLM2) == "<repo_name>myproject<file_sep>x.py\ny\n<file_sep><fim_prefix>filename\na<fim_suffix>b<fim_middle>"
    assert ids[0] == SMOLLM2["<repo_name>"] and SMOLLM2["<file_sep>"] in ids
    assert sorted(f.stop_token_ids) == sorted([SMOLLM2["<|endoftext|>"], SMOLLM2["<repo_name>"], SMOLLM2["<file_sep>"]])


def test_none_disables_and_unknown_names_are_refused():
    assert fim.choose(QWEN, None, fim.NONE) is None
    with pytest.raises(ValueError, match="unknown FIM template 'gpt'.*auto, none, qwen, starcoder"):
        fim.choose(QWEN, None, "gpt")
