"""The row-sparse item tables across workers: kept out of DDP, broadcast once, their gradients exchanged by row.

Every worker all-gathers (row ids, row gradients), padded to the largest worker's count, and sums them; the
bytes per step scale with the rows touched, W · max_w(rows_w) · (D + 1), not with M (benchmarks/scale.md).
The tables themselves and their optimizer are the model's (macrid/model/row_sparse.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def ignore_in_ddp(model: nn.Module, tables: list[nn.Parameter]) -> None:
    """Keep the tables out of DDP's dense all-reduce (and out of its start-up broadcast)."""
    names = [name for name, p in model.named_parameters() if any(p is t for t in tables)]
    # DDP matches some checks against "<module>.<param>", which is ".h" for a root-level parameter
    names += [f".{n}" for n in names if "." not in n]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def broadcast_tables(tables: list[nn.Parameter]) -> None:
    """Rank 0's initial tables to every rank: what DDP does for the parameters it manages."""
    for p in tables:
        dist.broadcast(p.data, src=0)


def allreduce_rows(grad: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """Average a sparse (M, D) gradient over `world` ranks, exchanging only its rows.

    Returns the averaged sparse gradient, coalesced, and the bytes this rank received.

    Host syncs: two (coalesce sizes the local rows; the gathered counts size the padding, read back in one
    transfer, not one `.item()` per rank). The sum is coalesced again at the end for the optimizer.
    """
    g = grad.coalesce()
    ids, rows = g.indices()[0], g.values()  # (R,), (R, D)
    R = ids.shape[0]  # host-side: coalesce already synced
    count = torch.full((1,), R, dtype=torch.long, device=ids.device)
    counts = torch.empty(world, dtype=torch.long, device=ids.device)  # (W,)
    dist.all_gather_into_tensor(counts, count)
    n = counts.tolist()  # one transfer: the padded size must be known on the host
    n_max = max(n)
    pad_ids = ids.new_zeros(n_max)
    pad_ids[:R] = ids
    pad_rows = rows.new_zeros((n_max, rows.shape[1]))
    pad_rows[:R] = rows
    all_ids = [torch.empty_like(pad_ids) for _ in range(world)]
    all_rows = [torch.empty_like(pad_rows) for _ in range(world)]
    dist.all_gather(all_ids, pad_ids)
    dist.all_gather(all_rows, pad_rows)
    ids_cat = torch.cat([i[:k] for i, k in zip(all_ids, n)])
    rows_cat = torch.cat([r[:k] for r, k in zip(all_rows, n)]) / world
    received = world * n_max * (pad_ids.element_size() + pad_rows.shape[1] * pad_rows.element_size())
    out = torch.sparse_coo_tensor(ids_cat.unsqueeze(0), rows_cat, grad.shape, check_invariants=False).coalesce()
    return out, received
