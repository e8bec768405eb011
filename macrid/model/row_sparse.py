"""Row-sparse item tables: the optimizer and the gradient exchange that keep a step flat in M.

With sampled softmax a step reads only the rows of h (item embeddings) for its C candidates and
the rows of t (context embeddings) for its N input items. Dense handling would still cost O(M·D)
per step three times over: zeroing and all-reducing an M x D gradient, and an Adam update that
walks every row's moments. At M = 10^6, D = 100 that is 800 MB of all-reduce per step for the two
tables (benchmarks/scale.md). Here instead:

- the tables produce sparse gradients (`F.embedding(..., sparse=True)`, `embedding_bag(sparse=True)`);
- they are left out of DDP, whose bucketed all-reduce is dense, and exchanged row-wise
  (macrid/training/row_exchange.py: the collectives live with the training loop, not the model);
- `torch.optim.SparseAdam` updates only the touched rows ("lazy Adam": a row's moments decay only
  on the steps that touch it), and Adam or SGD updates the small dense parameters as before.
"""

from __future__ import annotations

import torch
from torch import nn


def tables_of(model: nn.Module, row_sparse: bool) -> list[nn.Parameter]:
    """The model's item tables when training row-sparse, else none."""
    return [getattr(model, name) for name in model.item_tables] if row_sparse else []


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
