"""The exponential moving average of the weights (optim.ema), row-lazy for the row-sparse item tables.

The average is a_1 = p_1 and a_t = d * a_{t-1} + (1 - d) * p_t after every optimizer step t (torch's
`AveragedModel` with `get_ema_multi_avg_fn(d)`; its state_dict layout is kept, so checkpoints load either way).
Done densely, that lerps every row of the M x D tables on every step: 2 x 400 MB read and written per step at
M = 10^6, D = 100, for a step that touched a few thousand rows.

A table row that no step touched since step s is constant, p_s, and its average then has a closed form:
a_t = p_s + d^(t - s) * (a_s - p_s). So each table keeps `last` (M,), the step its row's average is current
at, and a step does, for the rows R its optimizer is about to change (the rows of the sparse gradient):
1. before the optimizer step, a[R] at step t - 1 by the closed form (p[R] is still p_s there), kept aside;
2. after it, the usual lerp of those rows towards the new p[R], written once, and last[R] = t.
`flush()` brings every row to the current step the same way (O(M * D), once per epoch, before evaluation
and the checkpoint). The dense parameters are lerped every step, as before. Everything stays on the
parameters' device, and the step counter is a host int, so an update never syncs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """EMA of `model`'s parameters with decay `decay`; `tables` (row-sparse M x D parameters) averaged row-lazily.

    `optimizers`: what changes the tables (their pre-step hooks catch the touched rows up before they move).
    `module` holds the average; call `flush()` before reading it."""

    def __init__(self, model: nn.Module, decay: float, tables: list[nn.Parameter], optimizers: list):
        self.decay = decay
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.steps = 0  # updates done so far (AveragedModel's n_averaged), on the host
        self._pairs = list(zip(self.module.parameters(), model.parameters(), strict=True))  # (average, model)
        self._buffers = list(zip(self.module.buffers(), model.buffers(), strict=True))
        self._lazy = {id(p): i for i, (_, p) in enumerate(self._pairs) if any(p is t for t in tables)}
        # per lazy table: the step its row's average is current at, (M,) int64 on the table's device
        self._last = {i: torch.zeros(self._pairs[i][1].shape[0], dtype=torch.long, device=self._pairs[i][1].device)
                      for i in self._lazy.values()}
        self._dense = [i for i in range(len(self._pairs)) if i not in self._last]
        self._touched: dict[int, tuple] = {}  # lazy table -> (the rows the coming step changes, their average at t-1)
        self._buffers_by_slot: dict[tuple, torch.Tensor] = {}  # (table, 0 average / 1 parameter) -> (R_max, D)
        if self._lazy:
            for opt in optimizers:
                opt.register_step_pre_hook(self._before_step)

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        """Step 1 above, for the tables this optimizer holds: their gradient's rows are the rows it changes.

        The gradient is coalesced here (SparseAdam coalesces it anyway, and then finds it done), so each row
        is caught up once; the caught-up rows are kept, not written back: `update` writes them once."""
        if self.steps == 0:
            return  # the first update copies everything
        for group in optimizer.param_groups:
            for p in group["params"]:
                i = self._lazy.get(id(p))
                if i is None or p.grad is None:
                    continue
                if p.grad.is_sparse:
                    p.grad = p.grad.coalesce()
                    rows = p.grad.indices()[0]  # (R,) distinct
                else:  # a dense gradient changes every row
                    rows = torch.arange(p.shape[0], device=p.device)
                avg = self._pairs[i][0]
                k = (self.steps - self._last[i].index_select(0, rows)).to(avg.dtype).unsqueeze(1)  # (R, 1)
                a, p_old = self._gather(avg, rows, (i, 0)), self._gather(p.detach(), rows, (i, 1))  # (R, D)
                self._touched[i] = rows, a.sub_(p_old).mul_(torch.pow(self.decay, k)).add_(p_old)  # a[R] at t - 1

    def _gather(self, table: torch.Tensor, rows: torch.Tensor, slot: tuple) -> torch.Tensor:
        """table[rows] (R, D) into a buffer kept across steps: on the CPU, a fresh (R, D) allocation per step
        (page faults on new memory) costs more than the gather and the arithmetic together."""
        buf = self._buffers_by_slot.get(slot)
        if buf is None or buf.shape[0] < rows.shape[0]:
            buf = self._buffers_by_slot[slot] = table.new_empty((int(rows.shape[0] * 1.25) + 1, table.shape[1]))
        return torch.index_select(table, 0, rows, out=buf[:rows.shape[0]])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """After optimizer step t: a = lerp(a, p, 1 - d) for the dense parameters and the tables' touched rows."""
        self.steps += 1
        if self.steps == 1:
            for avg, p in self._pairs:
                avg.copy_(p.detach())
            for i in self._last:
                self._last[i].fill_(1)
        else:
            dense = [self._pairs[i] for i in self._dense]
            if dense:
                torch._foreach_lerp_([a for a, _ in dense], [p.detach() for _, p in dense], 1 - self.decay)
            for i, (rows, caught_up) in self._touched.items():
                avg, param = self._pairs[i]
                avg.index_copy_(0, rows, caught_up.lerp_(self._gather(param.detach(), rows, (i, 1)), 1 - self.decay))
                self._last[i].index_fill_(0, rows, self.steps)
        self._touched.clear()
        for b_avg, b in self._buffers:
            b_avg.copy_(b.detach())

    @torch.no_grad()
    def flush(self) -> None:
        """Every table row's average brought to the current step, so `module` is the exact EMA."""
        for i, last in self._last.items():
            avg, param = self._pairs[i]
            k = (self.steps - last).to(avg.dtype).unsqueeze(1)  # (M, 1)
            p = param.detach()
            avg.copy_(p + torch.pow(self.decay, k) * (avg - p))
            last.fill_(self.steps)

    def state_dict(self) -> dict:
        """AveragedModel's layout: "module.<name>" weights (flushed) and n_averaged."""
        self.flush()
        return {f"module.{k}": v for k, v in self.module.state_dict().items()} | {
            "n_averaged": torch.tensor(self.steps, dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict({k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")})
        self.steps = int(state["n_averaged"])
        for last in self._last.values():
            last.fill_(self.steps)
