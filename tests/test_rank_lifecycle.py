"""Rank processes as users meet them: scripts without a main guard, engines dropped without
``shutdown()``, a second engine while the first is alive, a rank killed from outside."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from csps import LLM, SamplingParams
from csps.errors import CspsError

TIMEOUT_S = 120
PROMPT = [[1, 2, 3, 4] * 8]


def _gone(pid: int, within_s: float) -> bool:
    end = time.time() + within_s
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our own child: reap it so it does not linger as a zombie
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


def _run_script(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def test_a_script_without_main_guard_runs_at_sp_and_tp(tmp_path):
    r = _run_script(tmp_path, """
        from csps import LLM, SamplingParams
        llm = LLM("dummy:tiny", sp=2, dtype="float32")
        print("SP", llm.generate([[1, 2, 3, 4] * 8], SamplingParams(max_tokens=3))[0].token_ids)
        llm.shutdown()
        llm = LLM("dummy:tiny", tp=2, dtype="float32")
        print("TP", llm.generate([[1, 2, 3, 4] * 8], SamplingParams(max_tokens=3))[0].token_ids)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in r.stdout.splitlines() if ln[:3] in ("SP ", "TP ")}
    assert set(lines) == {"SP", "TP"}
    assert all(len(eval(v)) == 3 for v in lines.values())


def test_interpreter_exit_stops_the_ranks(tmp_path):
    r = _run_script(tmp_path, """
        from csps import LLM
        llm = LLM("dummy:tiny", sp=2, dtype="float32")
        print("PIDS", *[p.pid for p in llm.engine.rank_group.procs])
    """)  # no shutdown(), no del: the interpreter exits with the engine alive
    assert r.returncode == 0, r.stderr[-3000:]
    pids = [int(x) for ln in r.stdout.splitlines() if ln.startswith("PIDS") for x in ln.split()[1:]]
    assert len(pids) == 1
    assert _gone(pids[0], 10.0), "rank 1 outlived the interpreter"


def test_dropping_an_engine_stops_its_ranks_and_a_new_one_starts():
    llm = LLM("dummy:tiny", sp=2, dtype="float32", token_budget=64)
    want = llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    pids = [p.pid for p in llm.engine.rank_group.procs]
    del llm
    gc.collect()
    assert all(_gone(pid, 10.0) for pid in pids)
    t0 = time.time()
    with LLM("dummy:tiny", sp=2, dtype="float32", token_budget=64) as again:
        assert again.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0))[0].token_ids == want
    assert time.time() - t0 < 60


def test_a_second_engine_while_the_first_runs_fails_at_once():
    with LLM("dummy:tiny", sp=2, dtype="float32") as first:
        t0 = time.time()
        with pytest.raises(CspsError, match=r"still running.*shutdown\(\)"):
            LLM("dummy:tiny", sp=2, dtype="float32")
        assert time.time() - t0 < 5
        # the first engine is unharmed
        assert len(first.generate(PROMPT, SamplingParams(max_tokens=2))[0].token_ids) == 2


def test_a_rank_killed_from_outside_is_reported_by_name():
    with LLM("dummy:tiny", sp=2, dtype="float32", sp_threshold_tokens=16) as llm:
        os.kill(llm.engine.rank_group.procs[0].pid, signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(CspsError, match="rank 1 died with exit code -9"):
            llm.generate(PROMPT, SamplingParams(max_tokens=2))
        assert time.time() - t0 < 30


def test_every_layout_runs_the_same_engine_class():
    with LLM("dummy:tiny", dtype="float32") as one, LLM("dummy:tiny", dtype="float32", sp=1) as same:
        assert type(one.engine) is type(same.engine)
        assert one.engine.rank_group is None and one.engine.rt.groups.world.size == 1
        single = type(one.engine)
    with LLM("dummy:tiny", sp=2, dtype="float32") as two:
        assert type(two.engine) is single and two.engine.rt.groups.world.size == 2
