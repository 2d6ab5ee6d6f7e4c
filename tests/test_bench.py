"""`csps bench` on the real engine (tiny model, short prompts), the workloads and the report helpers.
No timing assertions: the machines are shared; only structure and plausibility are checked."""

from __future__ import annotations

import json
import math
import random

import pytest

from csps.bench.report import distribution, format_table, percentile
from csps.bench.workloads import WorkloadConfig, arrival_times, book_text, make_workload
from csps.device import resolve_dtype
from csps.dtypes import DTYPE_BYTES
from csps.errors import CspsError


@pytest.fixture(autouse=True)
def _private_probe_cache(tmp_path_factory, monkeypatch):
    """The hardware probe cache lives in a per-session temp dir, not in ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg"))


@pytest.fixture(scope="module")
def bench_doc(tmp_path_factory):
    from csps.cli import main

    d = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg"))
        code = main(["bench", "--model", "dummy:tiny", "--prompt-len", "200", "--output-len", "6", "--num-prompts",
                     "3", "--no-progress", "--json", str(d / "b.json"), "--plot", str(d / "b.png")])
    assert code == 0
    return json.loads((d / "b.json").read_text()), d


def test_bench_json_has_every_field_with_plausible_values(bench_doc):
    doc, d = bench_doc
    run = doc["results"]["stall-free"]
    assert run["num_requests"] == run["num_finished"] == 3
    assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["max"] < 600
    tbt = run["tbt_s"]
    assert tbt["count"] == 3 * 5
    assert 0 < tbt["p50"] <= tbt["p90"] <= tbt["p99"] <= tbt["max"] < 60
    assert run["prefill_tokens"] == 600 and run["decode_tokens"] == 3 * 5
    assert run["prefill_tokens_per_s"] > 0 and run["decode_tokens_per_s"] > 0
    assert run["achieved_flops_per_s"] > 0 and run["peak_flops_per_s"] > 1e8
    assert 0 < run["fraction_of_peak"] < 2
    assert run["bytes_per_step_by_kind"] == {}  # one rank: nothing moves between ranks
    dtype = doc["config"]["engine"]["dtype"]  # auto: bf16 on CPUs with native bf16, else fp32
    assert dtype == resolve_dtype("auto")
    kv_per_token = 2 * 2 * 2 * 16 * DTYPE_BYTES[dtype]  # 2 (k, v) x 2 layers x 2 kv heads x 16 dims x dtype
    assert 3 * 206 * kv_per_token <= run["peak_kv_bytes_per_rank"][0] <= 3 * 224 * kv_per_token
    assert run["num_steps"] >= 6 and run["duration_s"] > 0 and run["predicted_duration_s"] > 0
    assert doc["git"]["revision"] and doc["versions"]["torch"] and doc["machine"]["cpu_count"] >= 1
    assert doc["config"]["engine"]["token_budget"] == 512
    assert doc["config"]["workload"]["prompt_len"] == 200
    assert (d / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_policies_side_by_side_on_a_long_prompt_mix(tmp_path, capsys):
    from csps.cli import main

    out = tmp_path / "mix.json"
    code = main(["bench", "--model", "dummy:tiny", "--prompt-len", "64", "--output-len", "24", "--num-prompts", "4",
                 "--long-prompt-len", "1k", "--long-output-len", "2", "--long-arrival", "0.05",
                 "--compare-policies", "--no-progress", "--json", str(out)])
    assert code == 0
    assert "ratio = prefill-first / stall-free" in capsys.readouterr().out
    res = json.loads(out.read_text())["results"]
    for policy in ("stall-free", "prefill-first"):
        assert res[policy]["num_finished"] == 5 and res[policy]["long_prompt_ttft_s"] > 0
        assert res[policy]["tbt_s"]["count"] == 4 * 23 + 1
    assert res["prefill-first"]["max_prefill_tokens_per_step"] >= 1024  # the whole long prompt in one step
    assert res["stall-free"]["max_prefill_tokens_per_step"] <= 512  # chunks within the token budget


def test_compare_chunking_with_long_baselines_on_the_real_engine(tmp_path, capsys):
    """Time budget vs token budget, each on the workload, without its long prompt and on the long prompt alone:
    six runs of one engine config on the same requests, the report and the TBT plot."""
    from csps.cli import main

    out, png = tmp_path / "chunking.json", tmp_path / "tbt.png"
    code = main(["bench", "--model", "dummy:tiny", "--prompt-len", "64", "--output-len", "16", "--num-prompts", "3",
                 "--long-prompt-len", "1k", "--long-output-len", "2", "--long-arrival", "0.05", "--compare-chunking",
                 "--long-baselines", "--no-progress", "--json", str(out), "--plot-tbt", str(png)])
    assert code == 0
    text = capsys.readouterr().out
    assert "ratio = token-budget / time-budget" in text and "TBT ratio" in text
    doc = json.loads(out.read_text())
    res, report = doc["results"], doc["long_arrival"]
    variants = ("", "/without-long", "/long-alone")
    assert set(res) == {f"{m}{v}" for m in ("time-budget", "token-budget") for v in variants}
    for mode, adaptive in (("time-budget", True), ("token-budget", False)):
        assert res[mode]["scheduler"] == {"policy": "stall-free", "adaptive_chunking": adaptive,
                                          "step_time_budget_ms": None, "token_budget": 512}
        assert res[mode]["num_finished"] == 4 and res[mode]["long_prompt_ttft_s"] > 0
        assert res[f"{mode}/without-long"]["num_finished"] == 3
        assert res[f"{mode}/without-long"]["long_prompt_ttft_s"] is None
        alone = res[f"{mode}/long-alone"]
        assert alone["num_finished"] == 1 and alone["tbt_s"]["count"] == 1
        assert alone["prefill_tokens"] == 1024 and alone["max_prefill_tokens_per_step"] == 512  # same budget
        row = report[mode]
        assert row["tbt_p99_ratio"] == pytest.approx(res[mode]["tbt_s"]["p99"]
                                                     / res[f"{mode}/without-long"]["tbt_s"]["p99"])
        assert row["long_ttft_ratio"] == pytest.approx(res[mode]["long_prompt_ttft_s"] / alone["long_prompt_ttft_s"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_time_refuses_with_a_suggestion(capsys):
    from csps.cli import main

    code = main(["bench", "--model", "dummy:tiny", "--prompt-len", "4k", "--max-time", "1ms", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--max-time" in err and "--simulate" in err


def test_long_context_warning(caplog):
    from csps.bench.run import warn_long_context
    from csps.presets import preset_model_config

    tiny = preset_model_config("dummy:tiny")
    with caplog.at_level("WARNING"):
        warn_long_context(262144 + 64, tiny)
    assert "beyond" in caplog.text and "8192" in caplog.text


def test_auto_token_budget():
    from csps.bench.run import auto_token_budget

    assert auto_token_budget(1, 262144, 16) == 8192
    assert auto_token_budget(1, 2000, 16) == 512
    assert auto_token_budget(5, 262144, 16) == 512


# --- workloads -------------------------------------------------------------------------------------------

def test_random_workload_is_seeded_and_sized():
    cfg = WorkloadConfig(num_prompts=5, prompt_len=100, output_len=7, range_ratio=0.2, seed=3)
    a, b = make_workload(cfg, vocab_size=1000), make_workload(cfg, vocab_size=1000)
    assert a == b
    assert all(80 <= s.prompt_len <= 120 and len(s.prompt_ids) == s.prompt_len for s in a)
    assert all(3 <= t < 1000 for s in a for t in s.prompt_ids)
    lengths_only = make_workload(cfg, with_ids=False)
    assert [s.prompt_len for s in lengths_only] == [s.prompt_len for s in a]


def test_long_prompt_mix_and_arrivals():
    cfg = WorkloadConfig(num_prompts=3, prompt_len=10, output_len=5, long_prompt_len=1000, long_arrival_s=0.5)
    specs = make_workload(cfg, with_ids=False)
    assert [s.tag for s in specs] == ["", "", "", "long"] and specs[-1].arrival_s == 0.5
    times = arrival_times(4000, 10.0, "poisson", seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.05)
    assert arrival_times(3, 2.0, "fixed") == [0.0, 0.5, 1.0]
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]


def test_books_and_code_datasets(smollm2_tokenizer, tmp_path):
    text = book_text()
    assert "Elizabeth" in text and len(text) > 1_000_000
    for dataset in ("books", "code"):
        cfg = WorkloadConfig(dataset=dataset, num_prompts=2, prompt_len=300, output_len=4, seed=1)
        specs = make_workload(cfg, tokenizer=smollm2_tokenizer)
        assert [len(s.prompt_ids) for s in specs] == [300, 300]
        assert specs[0].prompt_ids != specs[1].prompt_ids
    code = smollm2_tokenizer.decode(list(make_workload(WorkloadConfig(dataset="code", prompt_len=400, output_len=1),
                                                       tokenizer=smollm2_tokenizer)[0].prompt_ids))
    assert "def " in code or "import " in code
    small = tmp_path / "tiny.txt"
    small.write_text("one two three")
    wrapped = make_workload(WorkloadConfig(dataset="books", path=str(small), prompt_len=50, output_len=1),
                            tokenizer=smollm2_tokenizer)
    assert len(wrapped[0].prompt_ids) == 50  # short texts wrap around
    with pytest.raises(CspsError, match="no books found"):
        make_workload(WorkloadConfig(dataset="books", path=str(tmp_path / "missing")), tokenizer=smollm2_tokenizer)


@pytest.mark.parametrize("bad", [dict(dataset="tweets"), dict(num_prompts=0), dict(range_ratio=1.5),
                                 dict(request_rate_per_s=0), dict(arrival="bursty")])
def test_workload_config_validation(bad):
    with pytest.raises(CspsError):
        WorkloadConfig(**bad)


# --- report ---------------------------------------------------------------------------------------------

def test_percentiles_match_numpy():
    np = pytest.importorskip("numpy")
    xs = [random.Random(0).random() for _ in range(101)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None
    d = distribution([1.0, 2.0, 3.0])
    assert d["mean"] == 2.0 and d["p50"] == 2.0 and d["max"] == 3.0 and d["count"] == 3


def test_table_has_ratio_column():
    base = {"num_finished": 1, "duration_s": 1.0, "ttft_s": distribution([1.0]), "tbt_s": distribution([0.1]),
            "queue_s": distribution([0.0]), "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0,
            "achieved_flops_per_s": 1e9, "fraction_of_peak": 0.5, "num_steps": 3,
            "step_time_s": distribution([0.1]), "bytes_per_step_by_kind": {}, "peak_kv_bytes_per_rank": [1024.0]}
    slow = {**base, "tbt_s": distribution([0.5])}
    table = format_table({"a": base, "b": slow}, ratio_of=("b", "a"))
    assert "ratio = b / a" in table and "5x" in table and "TBT p99" in table


def test_cli_parsers():
    from csps.bench.cli import parse_rate, parse_seconds, parse_slo

    assert parse_seconds("10m") == 600 and parse_seconds("250ms") == 0.25 and parse_seconds("90") == 90
    assert parse_slo("ttft=2s tbt=100ms") == {"ttft": 2.0, "tbt": 0.1}
    assert parse_slo("tbt=0.2") == {"tbt": 0.2}
    assert math.isinf(parse_rate("inf")) and parse_rate("2.5") == 2.5
    import argparse

    for f, bad in ((parse_seconds, "soon"), (parse_slo, "latency=1"), (parse_rate, "-1")):
        with pytest.raises(argparse.ArgumentTypeError):
            f(bad)


def test_validate_reports_prediction_error_per_case(tmp_path, capsys):
    from csps.cli import main

    out = tmp_path / "v.json"
    code = main(["bench", "--validate", "--model", "dummy:tiny", "--validate-lengths", "256,1k",
                 "--validate-batches", "2", "--validate-repeats", "1", "--no-progress", "--json", str(out)])
    assert code == 0
    assert "median |error|" in capsys.readouterr().out
    res = json.loads(out.read_text())["results"]
    names = [c["case"] for c in res["cases"]]
    assert names[:3] == ["sp1 prefill 256", "sp1 prefill 1k", "sp1 decode batch 2"]
    assert len(names) == 6 or any(n.startswith("SP 2") for n in res["notes"])  # SP 2 skipped/failed is noted
    for c in res["cases"]:
        assert c["measured_s"] > 0 and c["predicted_s"] > 0
        assert c["error"] == pytest.approx((c["predicted_s"] - c["measured_s"]) / c["measured_s"])
    assert res["median_abs_error"] >= 0 and res["fits"]["sp1"]["profile"]["step_overhead_s"] >= 0
    # the fitted profile now predicts later runs of this model (the --max-time guard)
    from csps.bench.run import local_profile

    assert local_profile("dummy:tiny", DTYPE_BYTES[resolve_dtype("auto")])[1] == "fitted by --validate"
