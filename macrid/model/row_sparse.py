"""Row-sparse item tables: the optimizer and the gradient exchange that keep a step flat in M.

With sampled softmax a step reads only the rows of h (item embeddings) for its C candidates and
the rows of t (context embeddings) for its N input items. Dense handling would still cost O(M·D)
per step three times over: zeroing and all-reducing an M x D gradient, and an Adam update that
walks every row's moments. At M = 10^6, D = 100 that is 800 MB of all-reduce per step for the two
tables (benchmarks/scale.md). Here instead:

- the tables produce sparse gradients (`F.embedding(..., sparse=True)`, `embedding_bag(sparse=True)`);
- they are left out of DDP, whose bucketed all-reduce is dense, and exchanged row-wise: every
  worker all-gathers (row ids, row gradients), padded to the largest worker's count, and sums them;
  the bytes per step scale with the rows touched, W · max_w(rows_w) · (D + 1), not with M;
- `torch.optim.SparseAdam` updates only the touched rows ("lazy Adam": a row's moments decay only
  on the steps that touch it), and Adam or SGD updates the small dense parameters as before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def tables_of(model: nn.Module, row_sparse: bool) -> list[nn.Parameter]:
    """The model's item tables when training row-sparse, else none."""
    return [getattr(model, name) for name in model.item_tables] if row_sparse else []


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


class Optimizers:
    """Adam (or SGD) for the dense parameters plus SparseAdam for the row-sparse tables, as one optimizer."""

    def __init__(self, model: nn.Module, tables: list[nn.Parameter], name: str, lr: float, weight_decay: float):
        dense = [p for p in model.parameters() if not any(p is t for t in tables)]
        if name == "sgd":  # SGD takes sparse gradients as they are
            self.parts = [torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)]
        else:
            self.parts = [torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay)]
            if tables:
                self.parts.append(torch.optim.SparseAdam(tables, lr=lr))

    def zero_grad(self) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for opt in self.parts:
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def state_dict(self) -> dict:
        return {"parts": [opt.state_dict() for opt in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        parts = state["parts"] if "parts" in state else [state]  # checkpoints from before the split
        for opt, s in zip(self.parts, parts, strict=True):
            opt.load_state_dict(s)
