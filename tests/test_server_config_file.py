"""``csps serve --config FILE.yaml`` and vLLM's flag names: parsing only (no server is started)."""

from __future__ import annotations

import pytest

from csps.cli import build_parser


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


@pytest.fixture
def config(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "serve.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_every_kind_of_flag_from_the_file(config):
    a = parse("--config", config("""
model: dummy:tiny
max_model_len: 16k          # csps's own size syntax, parsed by the flag's type
tensor-parallel-size: 2     # vLLM's name
max-num-batched-tokens: 1024
enable-prefix-caching: false
api-key: secret
allowed-origins: [https://a.example, https://b.example]
metrics-compat: vllm
access-log: true
max-body-bytes: 1M
"""))
    assert a.model == "dummy:tiny" and a.max_model_len == 16 * 1024
    assert a.tp == 2 and a.token_budget == 1024 and a.no_prefix_caching is True
    assert a.api_key == "secret" and a.allowed_origins == ["https://a.example", "https://b.example"]
    assert a.metrics_compat == "vllm" and a.access_log is True and a.max_body_bytes == 1 << 20


def test_the_command_line_wins_before_or_after_config_even_at_default_values(config):
    path = config("tp: 2\nport: 9000\nmax-num-seqs: 8\nsp: 2\n")
    a = parse("--tp", "1", "--config", path, "--port", "8000")
    assert a.tp == 1 and a.port == 8000  # both equal the defaults: given on the command line all the same
    assert a.max_num_seqs == 8 and a.sp == 2  # not on the command line: from the file


def test_vllm_flag_names_are_aliases():
    a = parse("-tp", "2", "--max-num-batched-tokens", "256", "--no-enable-prefix-caching", "--max-num-seqs", "4")
    assert (a.tp, a.token_budget, a.no_prefix_caching, a.max_num_seqs) == (2, 256, True, 4)
    a = parse("--no-prefix-caching", "--enable-prefix-caching")
    assert a.no_prefix_caching is False
    d = parse()
    assert (d.tp, d.token_budget, d.no_prefix_caching) == (1, None, False)  # aliases do not change defaults (None:
    # the device's default, csps.device.default_token_budget)


@pytest.mark.parametrize("text,fragment", [
    ("bogus-flag: 1\n", "unknown setting(s)"),
    ("tp: many\n", "invalid int value"),
    ("- a\n- b\n", "must hold a mapping"),
    ("config: other.yaml\n", "cannot name another config file"),
    ("tp: [1\n", "not valid YAML"),
])
def test_bad_config_files_exit_with_a_clear_error(config, capsys, text, fragment):
    with pytest.raises(SystemExit) as e:
        parse("--config", config(text))
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err


def test_a_missing_config_file_says_so(capsys):
    with pytest.raises(SystemExit):
        parse("--config", "/nonexistent/serve.yaml")
    assert "cannot read the config file" in capsys.readouterr().err
