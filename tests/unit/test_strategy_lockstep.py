"""strategy.in_lockstep with two gloo processes: ranks validate in step (no Ray).

Kept apart from test_strategy.py so the spawned processes import little.
"""

from __future__ import annotations

import json

import torch

from kiln.engine import strategy


def _lockstep_rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        mine = (
            [(torch.full((2, 1), float(i)), torch.zeros(2)) for i in range(3)] if rank == 0 else []
        )
        fillers: list[float] = []
        yielded = [
            float(b[0][0, 0])
            for b in strategy.in_lockstep(
                mine, lambda b: fillers.append(float(b[0][0, 0])), torch.device("cpu")
            )
        ]
        with open(f"{out}/{rank}.json", "w") as f:
            json.dump({"yielded": yielded, "fillers": fillers}, f)
    finally:
        dist.destroy_process_group()


def test_ranks_validate_in_lockstep_even_with_no_batches(tmp_path):
    """Rank 1 has no validation batch: it gets rank 0's first one and runs it as filler,
    so both ranks make three forward passes (each FSDP forward is a collective)."""
    import json

    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_lockstep_rank, args=(init, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == {"yielded": [0.0, 1.0, 2.0], "fillers": []}
    assert got[1] == {"yielded": [], "fillers": [0.0, 0.0, 0.0]}
