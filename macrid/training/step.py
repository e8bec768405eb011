"""One optimizer step, and the precision it runs in. Plain torch: no I/O, no Ray (benchmarks/gpu.py uses it).

Precision (run.precision):
- "fp32": everything in fp32;
- "tf32": fp32 tensors, matmuls on CUDA tensor cores in TF32 (10-bit mantissa operands, fp32
  accumulation); on CPU the same as fp32;
- "bf16": the forward pass under bf16 autocast. The matmuls (encoder's f_nn, the decoder's GEMMs in
  mixture.py) take bf16 operands and produce fp32; the concept logits (small, and amplified by
  1/tau), the KL, the log-sum-exp and the loss are computed in fp32; evaluation always runs in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from macrid.model.loss import elbo_loss, multinomial_nll, own_items_nll
from macrid.model.row_sparse import Optimizers
from macrid.training.row_exchange import allreduce_rows
from macrid.model.sampling import NegativeSampler

Autocast = Callable[[], contextlib.AbstractContextManager]  # run.precision's context for the forward pass


class FullSoftmax:
    """optim.negatives = 0: the multinomial likelihood over all M items."""

    def __call__(self, model: torch.nn.Module, idx: torch.Tensor, off: torch.Tensor, autocast: Autocast
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast():
            out = model("score_all", idx, off)
        return multinomial_nll(out.log_scores, idx, off), out.kl


class SharedCandidates:
    """optim.negatives > 0, candidates "batch": every user scored on the batch's items plus S shared negatives,
    with the sampled-softmax correction log pi."""

    def __init__(self, sampler: NegativeSampler):
        self.sampler = sampler

    def __call__(self, model: torch.nn.Module, idx: torch.Tensor, off: torch.Tensor, autocast: Autocast
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        cand = self.sampler.candidates(idx)
        with autocast():
            out = model("score_candidates", idx, off, cand.items)
        return multinomial_nll(out.log_scores, cand.positions(idx), off, cand.log_pi), out.kl


class OwnItemsAndNegatives:
    """optim.negatives > 0, candidates "user": every user scored on its own items plus S shared negatives."""

    def __init__(self, sampler: NegativeSampler):
        self.sampler = sampler

    def __call__(self, model: torch.nn.Module, idx: torch.Tensor, off: torch.Tensor, autocast: Autocast
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        cand = self.sampler.candidates(idx)
        with autocast():
            out = model("score_own_and_negatives", idx, off, cand.items, cand.negatives)
        nll = own_items_nll(out.log_pos, out.log_neg, cand.items[cand.negatives], cand.log_pi_negatives, idx, off)
        return nll, out.kl


Objective = FullSoftmax | SharedCandidates | OwnItemsAndNegatives


def objective_for(candidates: str, sampler: NegativeSampler | None) -> Objective:
    """The softmax mode's scorer and likelihood, chosen once per run: full (no sampler), or sampled with
    optim.candidates "batch" or "user"."""
    if sampler is None:
        return FullSoftmax()
    return OwnItemsAndNegatives(sampler) if candidates == "user" else SharedCandidates(sampler)


def train_step(model: torch.nn.Module, opt: Optimizers, tables: list[torch.nn.Parameter], objective: Objective,
               idx: torch.Tensor, off: torch.Tensor, beta: float, world: int,
               autocast: Autocast = contextlib.nullcontext, kl_by_items: bool = False,
               frozen: tuple[torch.nn.Parameter, ...] = ()) -> tuple[torch.Tensor, dict, int]:
    """One optimizer step on a batch already on the model's device: the objective's forward pass and
    likelihood (full or sampled softmax, `objective_for`), then the row-wise exchange of the item tables.

    autocast: the precision context of the forward pass (run.precision); the loss is fp32 in any case.
    kl_by_items: weight each user's KL by its item count (optim.kl_by_items, see elbo_loss).
    frozen: parameters this step leaves as they are (optim.alternate): their gradients are dropped after
    the backward pass (and the exchange), so the optimizer skips them and their Adam moments stay put.

    Returns the loss, its parts (detached tensors), and the bytes this rank received in the row exchange.
    """
    nll, kl = objective(model, idx, off, autocast)
    loss, parts = elbo_loss(nll, kl, off, beta, kl_by_items=kl_by_items)
    opt.zero_grad()
    loss.backward()
    received = 0
    if world > 1:
        for p in tables:
            if any(p is f for f in frozen):  # dropped below: exchanging it would be wasted traffic
                continue
            p.grad, n_bytes = allreduce_rows(p.grad, world)
            received += n_bytes
    for p in frozen:
        p.grad = None
    opt.step()
    return loss, parts, received


def precision_context(precision: str, device: torch.device) -> Autocast:
    """run.precision -> the forward pass's autocast context (bf16), or none."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@contextlib.contextmanager
def tf32_scope(precision: str, device: torch.device):
    """TF32 matmuls on CUDA for what runs inside (a whole training step: forward and backward) when
    run.precision is "tf32". torch's switch is process-wide, so it is set on entry and put back on exit:
    validation, `finish` and the export, which run outside, stay fp32."""
    if device.type != "cuda" or precision != "tf32":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
