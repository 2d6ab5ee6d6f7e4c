"""One rank's block tables, kept up to date from the step plans it receives.

Every request with KV on the rank has a list of its blocks (in slot order) and a row of one int32
tensor ``[rows, max_blocks]`` holding the same ids (unused entries 0, the reserved zero block), which
the decode kernels read directly: a step names its sequences' rows, so no table is rebuilt or copied
per step. Applying a plan costs O(its new blocks), never O(context).
"""

from __future__ import annotations

import torch

from csps.core.plan import SeqWork, StepPlan


class RankBlockTables:
    def __init__(self, max_blocks_per_seq: int, num_rows: int = 64, device: str | torch.device = "cpu") -> None:
        self.max_blocks = max_blocks_per_seq
        self.tensor = torch.zeros(num_rows, max_blocks_per_seq, dtype=torch.int32, device=device)  # [rows, W]
        self.tables: dict[str, list[int]] = {}
        self.row_of: dict[str, int] = {}
        self.one_run: dict[str, bool] = {}  # the request's blocks are consecutive ids (its KV is one slab)
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def apply(self, plan: StepPlan) -> None:
        """Drop the freed requests' tables, then append the blocks each sequence allocated since its last plan."""
        for req_id in plan.free_req_ids:
            self.drop(req_id)
        for s in plan.seqs:
            self.extend(s)
        for s in plan.sp_seqs:
            self.extend(s.mine)

    def drop(self, req_id: str) -> None:
        table = self.tables.pop(req_id, None)
        row = self.row_of.pop(req_id, None)
        self.one_run.pop(req_id, None)
        if row is not None:
            self.tensor[row, : len(table)] = 0
            self._free_rows.append(row)

    def extend(self, s: SeqWork) -> None:
        table = self.tables.get(s.req_id)
        if table is None:
            table = self.tables[s.req_id] = []
            self.row_of[s.req_id] = self._take_row()
            self.one_run[s.req_id] = True
        new = s.new_block_ids
        if new:
            n0, n1 = len(table), len(table) + len(new)
            if n1 > self.max_blocks:
                raise ValueError(f"request {s.req_id} holds {n1} KV blocks on this rank, beyond the "
                                 f"{self.max_blocks} a context of max_model_len tokens needs")
            starts_after = not table or new[0] == table[-1] + 1
            self.one_run[s.req_id] &= starts_after and all(b == a + 1 for a, b in zip(new, new[1:]))
            table.extend(new)
            self.tensor[self.row_of[s.req_id], n0:n1] = torch.tensor(s.new_block_ids, dtype=torch.int32)

    def _take_row(self) -> int:
        if not self._free_rows:  # double the rows
            n = self.tensor.shape[0]
            self.tensor = torch.cat([self.tensor, torch.zeros_like(self.tensor)])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        return self._free_rows.pop()

    def __getitem__(self, req_id: str) -> list[int]:
        return self.tables.get(req_id, [])

    def block_ids(self, req_id: str, num_blocks: int) -> torch.Tensor:
        """The request's first ``num_blocks`` block ids, as int64 on the table's device (no Python list)."""
        return self.tensor[self.row_of[req_id], :num_blocks].long()

    def span(self, req_id: str, num_blocks: int) -> tuple[int, int] | None:
        """(first block, count) when the request's first ``num_blocks`` blocks are consecutive ids: its KV is
        then one slab of the cache, read without a gather."""
        if not self.one_run.get(req_id):
            return None
        return self.tables[req_id][0], num_blocks

    def rows(self, req_ids: list[str]) -> torch.Tensor:
        """The table rows of these requests: [len(req_ids)] int64."""
        return torch.tensor([self.row_of[r] for r in req_ids], dtype=torch.int64)
