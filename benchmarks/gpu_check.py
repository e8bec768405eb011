"""`python benchmarks/gpu.py --check`: the correctness checks a GPU session runs before any figure (< 3 min).

Each check prints one line (PASS, FAIL or SKIP, with its numbers); the run fails when any check fails.
On a CPU (`--check --smoke`, what the tests run) the CUDA-only checks say SKIP.
"""

from __future__ import annotations

import platform
import warnings

import numpy as np
import torch

from macrid.config import ModelConfig
from macrid.model.mixture import gemm_path, mixture_scores, mixture_scores_reference
from macrid.model.row_sparse import Optimizers, tables_of
from macrid.model.sampling import NegativeSampler
from macrid.model.vae import build_model
from macrid.training.evaluate import chunked_top_k
from macrid.training.metrics import top_k
from macrid.training.step import objective_for, precision_context, tf32_scope, train_step

SAMPLED_SYNC_BUDGET = 4  # candidates: 2 (their count, the distinct negatives); SparseAdam's coalesce: up to 2


class Checks:
    def __init__(self):
        self.failed: list[str] = []

    def report(self, name: str, ok: bool | None, detail: str) -> None:
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        if ok is False:
            self.failed.append(name)
        print(f"[{status}] {name}: {detail}", flush=True)


def run_checks(device: torch.device, shapes: dict, planted_bags, take, smoke: bool) -> list[str]:
    """Returns the names of the failed checks."""
    c = Checks()
    cuda = device.type == "cuda"
    c.report("versions", True, f"python {platform.python_version()}, torch {torch.__version__}, "
                               f"CUDA {torch.version.cuda}, device {torch.cuda.get_device_name() if cuda else 'cpu'}; "
                               f"bf16 GEMM: {gemm_path(device)}")
    for name, shape in shapes.items():
        small = dict(shape, users=min(shape["users"], 4000 if not smoke else 600))
        bags = planted_bags(small["users"], small["items"], small["mean_len"])
        for precision in ("fp32", "tf32", "bf16"):
            losses = _losses(device, bags, take, small, precision, steps=20, batch=256 if not smoke else 64)
            finite = all(np.isfinite(losses))
            falls = finite and np.mean(losses[-5:]) < np.mean(losses[:5])
            c.report(f"loss falls over 20 steps ({name}, {precision})", bool(falls),
                     f"first 5 mean {np.mean(losses[:5]):.2f}, last 5 mean {np.mean(losses[-5:]):.2f}")
    _bf16_tracks_fp32(c, device)
    _mixture_matches_reference(c, device)
    _sync_free_steps(c, device, shapes, planted_bags, take, smoke)
    _row_sparse(c, device)
    _chunked_top_k(c)
    n_gpus = torch.cuda.device_count() if cuda else 0
    c.report("NCCL: allreduce_rows = dense all-reduce, ranks identical after steps and re-centring", None,
             f"needs 2 GPUs ({n_gpus} here); on CPU, tests/test_distributed.py checks the same over gloo")
    return c.failed


def _setup(device, M, negatives, cfg=None):
    torch.manual_seed(0)
    sampled = negatives > 0
    model = build_model(cfg or ModelConfig(K=7, D=100 if M > 1000 else 16), M, row_sparse=sampled).to(device)
    tables = tables_of(model, sampled)
    opt = Optimizers(model, tables, "adam", 1e-3, 0.0)
    return model, tables, opt


def _losses(device, bags, take, shape, precision, steps, batch):
    M, S = shape["items"], shape["negatives"]
    model, tables, opt = _setup(device, M, S)
    indptr, indices = bags
    sampler = NegativeSampler(np.bincount(indices, minlength=M), S, 0.75, seed=0, device=device) if S else None
    autocast = precision_context(precision, device)
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(indptr) - 1)[:batch]  # one fixed batch: its loss must fall
    idx, off = (t.to(device) for t in take(indptr, indices, rows))
    out = []
    for _ in range(steps):
        with tf32_scope(precision, device):
            loss, _, _ = train_step(model, opt, tables, objective_for("user", sampler), idx, off, beta=0.2, world=1,
                                    autocast=autocast)
        out.append(float(loss.detach()))
    return out


def _bf16_tracks_fp32(c: Checks, device) -> None:
    rng = np.random.default_rng(3)
    M = 2000
    rows = [np.sort(rng.choice(M, rng.integers(10, 60), replace=False)) for _ in range(256)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    idx = torch.from_numpy(np.concatenate(rows).astype(np.int64)).to(device)
    off = torch.from_numpy(indptr).to(device)
    losses, grads = [], []
    for precision in ("fp32", "bf16"):
        model, tables, opt = _setup(device, M, 0, ModelConfig(K=7, D=64, dropout=0.0, gumbel=False, sample=False))
        opt = Optimizers(model, [], "sgd", 1e-12, 0.0)
        loss, _, _ = train_step(model, opt, [], objective_for("batch", None), idx, off, beta=0.2, world=1,
                                autocast=precision_context(precision, device))
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
    rel = abs(losses[1] - losses[0]) / abs(losses[0])
    cos = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
    c.report("bf16 within 1% of fp32 (no Gumbel, no z-sampling)", rel < 0.01 and cos > 0.99,
             f"loss {losses[0]:.4f} vs {losses[1]:.4f} ({100 * rel:.3f}%), gradient cosine {cos:.5f}")


def _mixture_matches_reference(c: Checks, device) -> None:
    g = torch.Generator().manual_seed(0)
    B, K, D, M = 8, 5, 32, 700
    zn = torch.nn.functional.normalize(torch.randn(B, K, D, generator=g), dim=-1).to(device).requires_grad_()
    hn = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1).to(device).requires_grad_()
    cc = torch.softmax(torch.randn(M, K, generator=g), 1).to(device).requires_grad_()
    gA = torch.randn(B, M, generator=g).to(device)
    out = []
    for fn in (mixture_scores, mixture_scores_reference):
        A = fn(zn, hn, cc, 0.1)
        grads = torch.autograd.grad(A, (zn, hn, cc), gA)
        out.append((A.detach(), grads))
    err_f = float(((out[0][0] - out[1][0]).abs() / out[1][0].abs()).max())
    err_g = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(out[0][1], out[1][1], strict=True))
    c.report(f"mixture_scores = reference on {device.type}, forward and gradients", err_f < 1e-4 and err_g < 1e-4,
             f"max relative error {err_f:.2e} (scores), {err_g:.2e} (gradients)")


def _sync_free_steps(c: Checks, device, shapes, planted_bags, take, smoke) -> None:
    if device.type != "cuda":
        c.report("full-softmax step without host syncs", None, "needs CUDA (torch.cuda.set_sync_debug_mode)")
        c.report("sampled step within its sync budget", None, "needs CUDA")
        return
    for name, shape in shapes.items():
        small = dict(shape, users=min(shape["users"], 2000))
        indptr, indices = planted_bags(small["users"], small["items"], small["mean_len"])
        S = shape["negatives"]
        model, tables, opt = _setup(device, shape["items"], S)
        sampler = NegativeSampler(np.bincount(indices, minlength=shape["items"]), S, 0.75, device=device) if S else None
        idx, off = (t.to(device) for t in take(indptr, indices, np.arange(256)))
        for _ in range(2):  # warm-up: optimizer state, cuBLAS handles
            train_step(model, opt, tables, objective_for("user", sampler), idx, off, 0.2, 1)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_step(model, opt, tables, objective_for("user", sampler), idx, off, 0.2, 1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        budget = SAMPLED_SYNC_BUDGET if S else 0
        c.report(f"{'sampled' if S else 'full-softmax'} step syncs ({name})", len(syncs) <= budget,
                 f"{len(syncs)} host syncs (budget {budget}){': ' + '; '.join(syncs[:3]) if syncs else ''}")


def _row_sparse(c: Checks, device) -> None:
    M, S = 5000, 64
    model, tables, opt = _setup(device, M, S, ModelConfig(K=4, D=16))
    rng = np.random.default_rng(1)
    idx = torch.from_numpy(np.sort(rng.choice(M, 40, replace=False))).to(device)
    off = torch.tensor([0, 20, 40], device=device)
    sampler = NegativeSampler(np.ones(M), S, 0.0, seed=2, device=device)
    before = {id(p): p.detach().clone() for p in tables}
    state = sampler.generator.get_state()
    cand = sampler.candidates(idx)
    sampler.generator.set_state(state)  # the step draws the same candidates
    train_step(model, opt, tables, objective_for("batch", sampler), idx, off, 0.2, 1)
    ok, detail = True, []
    for p in tables:
        changed = (p.detach() != before[id(p)]).any(1).nonzero().squeeze(1)
        only_candidates = bool(torch.isin(changed, cand.items).all())
        sparse = p.grad is None or p.grad.is_sparse
        ok &= only_candidates and sparse and len(changed) > 0
        detail.append(f"{tuple(p.shape)}: {len(changed)} rows changed of {len(cand.items)} candidates")
    c.report("row-sparse gradients sparse, SparseAdam changes only candidate rows", ok, "; ".join(detail))


def _chunked_top_k(c: Checks) -> None:
    M = 103
    torch.manual_seed(0)
    model = build_model(ModelConfig(K=3, D=8), M).eval()
    with torch.no_grad():
        model.h.data[10:40] = model.h.data[9]  # ties across chunk borders
    idx = torch.tensor([1, 9, 10, 50, 11, 12, 70, 102])
    off = torch.tensor([0, 3, 4, 8])
    with torch.no_grad():
        got, _ = chunked_top_k(model, idx, off, M, 50, chunk=8)
        scores = model.score(model.represent(idx, off), torch.arange(M)).float()
    scores[torch.repeat_interleave(torch.arange(3), off.diff()), idx] = -torch.inf
    want = top_k(scores, 50)
    c.report("chunked_top_k (chunk 8) = full-score top_k on the CPU, ties and fold-in exclusion",
             bool(torch.equal(got, want)), f"{M} items, 3 users, 30 tied items, k = 50")
