"""Entry point of a serving rank process: ``python -m csps.parallel.rank_entry`` (see ``rank_group``).

A module of its own so that the child's ``__main__`` is this file, never the caller's script."""

import sys

from csps.parallel.rank_group import run_rank

if __name__ == "__main__":
    run_rank(sys.stdin.buffer)
