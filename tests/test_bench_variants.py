"""Side-by-side runs of one `csps bench` invocation (issue 16): chunking modes (--compare-chunking), the workload
with and without its long prompt and the long prompt alone (--long-baselines), their report, and the TBT plot.
The simulator runs are the acceptance check in small: a long arrival among decodes on 8 H100s."""

from __future__ import annotations

import argparse
import json

import pytest

from csps.bench.report import RequestSample, distribution
from csps.bench.variants import (
    RunSetup,
    long_arrival_report,
    ratio_columns,
    run_setups,
    select,
    workload_variants,
)
from csps.bench.workloads import WorkloadConfig, make_workload
from csps.core.sampling_params import RequestMetrics
from csps.errors import CspsError

PNG = b"\x89PNG\r\n\x1a\n"


def flags(**kw) -> argparse.Namespace:
    base = dict(compare_policies=False, compare_chunking=False, schedule_policy="stall-free",
                step_time_budget_ms="auto", long_baselines=False, long_prompt_len=None, num_prompts=None)
    return argparse.Namespace(**{**base, **kw})


def test_setups_follow_the_flags():
    assert run_setups(flags()) == [RunSetup("stall-free", "stall-free", True, None)]
    assert run_setups(flags(step_time_budget_ms="off")) == [RunSetup("stall-free", "stall-free", False, None)]
    assert [s.name for s in run_setups(flags(compare_policies=True))] == ["stall-free", "prefill-first"]
    chunking = run_setups(flags(compare_chunking=True, step_time_budget_ms=40.0))
    assert chunking == [RunSetup("time-budget", "stall-free", True, 40.0),
                        RunSetup("token-budget", "stall-free", False, None)]
    assert ratio_columns(chunking) == ("token-budget", "time-budget")
    both = run_setups(flags(compare_chunking=True, compare_policies=True, step_time_budget_ms="off"))
    assert [s.name for s in both] == ["stall-free/time-budget", "stall-free/token-budget", "prefill-first"]
    assert both[0].adaptive_chunking and both[0].step_time_budget_ms is None  # the compared mode is auto
    assert ratio_columns(both) == ("stall-free/token-budget", "stall-free/time-budget")
    assert ratio_columns(run_setups(flags(compare_policies=True))) == ("prefill-first", "stall-free")
    with pytest.raises(CspsError, match="prefill-first runs whole prompts"):
        run_setups(flags(compare_chunking=True, schedule_policy="prefill-first"))


def test_variants_are_cut_from_one_workload():
    cfg = WorkloadConfig(num_prompts=3, prompt_len=20, output_len=4, long_prompt_len=300, long_arrival_s=0.5, seed=3)
    specs = make_workload(cfg, vocab_size=1000)
    without, alone = select(specs, "without-long"), select(specs, "long-alone")
    assert select(specs, "") == specs and len(without) == 3 and [s.tag for s in alone] == ["long"]
    assert without + alone == specs  # the very same requests, prompt ids and arrival times included
    assert workload_variants(flags()) == ("",)
    assert workload_variants(flags(long_baselines=True, long_prompt_len=300)) == ("", "without-long", "long-alone")
    with pytest.raises(CspsError, match="--long-prompt-len"):
        workload_variants(flags(long_baselines=True))
    with pytest.raises(CspsError, match="--num-prompts"):
        workload_variants(flags(long_baselines=True, long_prompt_len=300, num_prompts=0))
    with pytest.raises(CspsError, match="variant"):
        select(specs, "long-only")


def test_report_divides_with_by_without_and_with_by_alone():
    def summary(tbts, long_ttft=None):
        return {"tbt_s": distribution(tbts), "long_prompt_ttft_s": long_ttft}

    summaries = {"a": summary([0.1] * 99 + [0.3], 5.0), "a/without-long": summary([0.1] * 100),
                 "a/long-alone": summary([0.05] * 10, 4.0), "b": summary([0.2], 2.0)}
    report = long_arrival_report(summaries, ["a", "b"])
    a = report["a"]
    assert a["tbt_p99_with_s"] == pytest.approx(0.102) and a["tbt_p99_without_s"] == pytest.approx(0.1)
    assert a["tbt_p99_ratio"] == pytest.approx(1.02)
    assert a["long_ttft_ratio"] == pytest.approx(1.25) and a["tbt_max_with_s"] == 0.3
    assert report["b"]["tbt_p99_ratio"] is None and report["b"]["long_ttft_ratio"] is None  # no baselines ran


def test_tbt_series_marks_the_long_prompt():
    from csps.bench.plot import tbt_series

    origin = 100.0
    short = RequestSample(10, 3, RequestMetrics(arrival_s=origin, token_times_s=[origin + 1, origin + 1.5, origin + 3]))
    other = RequestSample(10, 3, RequestMetrics(arrival_s=origin, token_times_s=[origin + 1, origin + 1.5, origin + 3]))
    long = RequestSample(500, 2, RequestMetrics(arrival_s=origin + 2, token_times_s=[origin + 2.8, origin + 3.1]),
                         tag="long")
    s = tbt_series([short, other, long], origin_s=origin, reference_p99_s=0.4)
    assert s.points == ((1.5, 0.5), (3.0, 1.5))  # the two requests' identical gaps appear once
    assert s.long_points == (pytest.approx((3.1, 0.3)),)
    assert s.long_arrival_s == 2.0 and s.long_first_token_s == pytest.approx(0.8 + 2.0)
    assert s.p99_s == 1.5 and s.reference_p99_s == 0.4  # every gap counts, duplicates included


def test_simulated_long_arrival_among_decodes_time_vs_token_budget(tmp_path, capsys):
    """A 64k prompt arrives among 16 decoding requests on 8 simulated H100s (TP8): sized to the time budget its
    chunks keep p99 TBT within 1.5x of the run without it; with the token budget alone they do not."""
    from csps.cli import main

    out, png = tmp_path / "sim.json", tmp_path / "tbt.png"
    code = main(["bench", "--simulate", "--hardware", "h100", "--gpus", "8", "--model", "dummy:llama3-8b",
                 "--num-prompts", "16", "--prompt-len", "2k", "--output-len", "512", "--long-prompt-len", "64k",
                 "--long-output-len", "4", "--long-arrival", "0.5s", "--strategies", "sarathi", "--compare-chunking",
                 "--long-baselines", "--no-progress", "--json", str(out), "--plot-tbt", str(png)])
    assert code == 0
    text = capsys.readouterr().out
    assert "ratio = sarathi-tp8/token-budget / sarathi-tp8/time-budget" in text and "TTFT ratio" in text
    doc = json.loads(out.read_text())
    res, report = doc["results"], doc["long_arrival"]
    assert set(res) == {f"sarathi-tp8/{m}{v}" for m in ("time-budget", "token-budget")
                        for v in ("", "/without-long", "/long-alone")}
    assert res["sarathi-tp8/time-budget"]["strategy"]["adaptive_chunking"] is True
    assert res["sarathi-tp8/token-budget"]["strategy"]["adaptive_chunking"] is False
    assert res["sarathi-tp8/time-budget/without-long"]["num_requests"] == 16
    assert res["sarathi-tp8/time-budget/long-alone"]["num_requests"] == 1
    # without decodes there is no time budget: the long prompt alone is chunked the same way in both modes
    assert (res["sarathi-tp8/time-budget/long-alone"]["num_steps"]
            == res["sarathi-tp8/token-budget/long-alone"]["num_steps"])
    time_b, token_b = report["sarathi-tp8/time-budget"], report["sarathi-tp8/token-budget"]
    assert time_b["tbt_p99_ratio"] == pytest.approx(res["sarathi-tp8/time-budget"]["tbt_s"]["p99"]
                                                    / res["sarathi-tp8/time-budget/without-long"]["tbt_s"]["p99"])
    assert time_b["tbt_p99_ratio"] <= 1.5 < token_b["tbt_p99_ratio"]
    assert time_b["long_ttft_ratio"] >= 1.0 and time_b["long_ttft_with_s"] > token_b["long_ttft_with_s"]
    assert png.read_bytes()[:8] == PNG


def test_simulate_honours_the_step_time_budget_flag(tmp_path):
    from csps.cli import main

    runs = {}
    for flag in ("off", "auto", "3"):
        out = tmp_path / f"{flag}.json"
        assert main(["bench", "--simulate", "--gpus", "1", "--model", "dummy:llama3-8b", "--num-prompts", "4",
                     "--prompt-len", "1k", "--output-len", "128", "--long-prompt-len", "32k", "--long-output-len", "2",
                     "--long-arrival", "0.1s", "--step-time-budget-ms", flag, "--no-progress",
                     "--json", str(out)]) == 0
        runs[flag] = json.loads(out.read_text())["results"]["sarathi-tp1"]
    assert runs["off"]["strategy"]["adaptive_chunking"] is False
    assert runs["3"]["strategy"]["step_time_budget_ms"] == 3.0
    # the tighter the budget, the smaller the long prompt's chunks among the decodes: lower TBT, later first token
    p99 = {k: r["tbt_s"]["p99"] for k, r in runs.items()}
    ttft = {k: r["long_prompt_ttft_s"] for k, r in runs.items()}
    assert p99["off"] > p99["auto"] > p99["3"]
    assert ttft["off"] < ttft["auto"] < ttft["3"]
