"""`csps generate`: streams text; bad input gets one line and a non-zero exit, never a traceback."""

import subprocess
import sys

import pytest


def csps(*args, stdin=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "csps.cli", *args], capture_output=True, text=True,
                          timeout=timeout, input=stdin)


def test_generate_streams_tokens():
    p = csps("generate", "--model", "dummy:tiny", "--dtype", "float32", "--max-tokens", "5", "-v", "hello world")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip(), "generated text goes to stdout"
    assert "5 generated" in p.stderr and "TTFT" in p.stderr


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model.gguf", "hi"], "model file not found"),
    (["--model", "dummy:nope", "hi"], "unknown preset dummy:nope"),
    (["--model", "dummy:llama3-70b", "hi"], "GiB"),
    (["--model", "dummy:tiny", "--max-model-len", "64", "word " * 100], "context is 64 tokens"),
    (["--model", "dummy:tiny", "--file", "/no/such/file.txt"], "cannot read"),
    (["--model", "dummy:tiny", "--tp", "5", "hi"], "exceeds the model's 4 attention heads"),
    (["--model", "dummy:tiny", "--token-budget", "100", "hi"], "multiple of the block size"),
])
def test_bad_input_is_one_clear_line(args, message):
    p = csps("generate", *args)
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.startswith("csps: error")]) == 1


def test_bad_length_suffix_is_a_usage_error():
    p = csps("generate", "--model", "dummy:tiny", "--max-model-len", "12q", "hi")
    assert p.returncode == 2 and "not a length" in p.stderr and "Traceback" not in p.stderr
