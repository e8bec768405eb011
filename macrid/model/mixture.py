"""The MacridVAE decoder's item scores with a hand-written, memory-lean backward.

    A[b, i] = sum_k c[i, k] * exp(cos(z_bk, h_i) / tau)          (decoder of Sec. 2.3)

Autograd would keep several B x K x M intermediates (the cosines, their
exponentials, the products with c). The function below keeps one, E = exp(S/tau),
and reuses it in place during the backward pass: about 5 passes over B x K x M
memory plus three GEMMs, which is what makes an epoch close to FLOP-bound on CPU.
Inputs must already be L2-normalised, so S is the cosine.

Precision: under bf16 autocast the three GEMMs take bf16 operands (tensor cores) and produce
fp32 (on CUDA directly through `out_dtype`, torch >= 2.8; on CPU, which exists to test this path, by a
cast), so
exp(S/tau), the mixture A and everything after it stay fp32. What bf16 costs is the rounding of
the operands (~2^-9 relative): measured at 1/tau = 10 (`python benchmarks/bf16_error.py`), A is off
by 0.14% at the median and 2.0% at most, and the log-sum-exp over items by at most 0.0004 nats.
The function does its own casting with autocast off, so that autocast does not cast again inside.
"""

from __future__ import annotations

import torch


OUT_DTYPE_TORCH = (2, 8)  # the first torch whose torch.mm takes out_dtype; infra/ pins at least this


def has_out_dtype() -> bool:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= OUT_DTYPE_TORCH


def gemm_path(device: torch.device | str) -> str:
    """Which way `_gemm` makes its fp32 result from bf16 operands on `device` (benchmarks/gpu.py prints it)."""
    if torch.device(device).type != "cuda":
        return "cast: bf16 product widened to fp32 (CPU, a test path)"
    if has_out_dtype():
        return "out_dtype: torch.mm writes fp32 directly"
    return ("fallback (torch < 2.8): a bf16 B*K x M product widened to fp32, one extra pass over it, 1.5x its "
            "buffer, and S/tau rounded to bf16 before exp")


def _gemm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b with operands in `dtype`: as they are when they already have it, else cast, with an fp32 result.

    On CUDA below torch 2.8 (no out_dtype) the product is made in bf16 and widened: see `gemm_path` for
    what that costs."""
    if dtype == a.dtype == b.dtype and dtype in (torch.float32, torch.float64):
        return a @ b
    a, b = a.to(dtype), b.to(dtype)  # no copy for an operand already in dtype (the backward's G2)
    if a.is_cuda and has_out_dtype():
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


class _WideMatmul(torch.autograd.Function):
    """a (B, D) @ b.T (D, C) with `dtype` operands and an fp32 result, forward and backward (the gradient
    GEMMs too): MultVAE's logits under bf16 autocast, never rounded to bf16."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.dtype = dtype
        return _gemm(a, b.T, dtype)  # (B, C): fp32 from bf16 operands, else in the operands' dtype

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        a, b = ctx.saved_tensors
        ga = _gemm(g, b, ctx.dtype).to(a.dtype) if ctx.needs_input_grad[0] else None  # (B, D)
        gb = _gemm(g.T, a, ctx.dtype).to(b.dtype) if ctx.needs_input_grad[1] else None  # (C, D)
        return ga, gb, None


def wide_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, D) @ b.T -> (B, C) in fp32; the operands in bf16 when bf16 autocast is on for a's device."""
    device = a.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
    with torch.autocast(device_type=device, enabled=False):
        return _WideMatmul.apply(a, b, dtype)


class _MixtureScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zn: torch.Tensor, hn: torch.Tensor, c: torch.Tensor, tau: float,
                dtype: torch.dtype) -> torch.Tensor:
        B, K, D = zn.shape
        zs = zn.reshape(B * K, D) * (1.0 / tau)  # fold 1/tau into the small operand: one pass less over E
        E = _gemm(zs, hn.T, dtype)  # (B*K, M) cos/tau, which lies in [-1/tau, 1/tau]
        E.exp_()  # cannot overflow for tau >= 0.02
        E = E.view(B, K, -1)  # (B, K, M)
        cT = c.T.contiguous()  # (K, M)
        A = E[:, 0] * cT[0]  # (B, M)
        for k in range(1, K):
            A.addcmul_(E[:, k], cT[k])
        ctx.save_for_backward(zs, hn, cT, E)
        ctx.tau, ctx.dtype = tau, dtype
        return A

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gA: torch.Tensor):
        with torch.autocast(device_type=gA.device.type, enabled=False):
            return _MixtureScores._backward(ctx, gA)

    @staticmethod
    def _backward(ctx, gA: torch.Tensor):
        zs, hn, cT, E = ctx.saved_tensors
        B, K = E.shape[:2]
        D = zs.shape[1]
        G = E.mul_(gA.unsqueeze(1))  # (B, K, M) dL/dA * exp(S/tau), reusing E's memory (backward runs once)
        gc = G.sum(0).T if ctx.needs_input_grad[2] else None  # (M, K)
        G.mul_(cT.unsqueeze(0))  # (B, K, M) dL/d(S/tau)
        G2 = G.view(B * K, -1)
        if G2.dtype != ctx.dtype and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            G2 = G2.to(ctx.dtype)  # once, for both GEMMs (not once for G2 and again for G2.T)
        gzn = _gemm(G2, hn, ctx.dtype).mul_(1.0 / ctx.tau).view(B, K, D) if ctx.needs_input_grad[0] else None
        ghn = _gemm(G2.T, zs, ctx.dtype) if ctx.needs_input_grad[1] else None  # (M, D); zs carries the 1/tau
        return gzn, ghn, gc, None, None


def mixture_scores(zn: torch.Tensor, hn: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """zn (B, K, D), hn (M, D) unit-norm; c (M, K) concept weights -> A (B, M) > 0, in the inputs' dtype.

    The GEMMs run in bf16 when bf16 autocast is on for the inputs' device (see the module notes).
    """
    device = zn.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else zn.dtype
    with torch.autocast(device_type=device, enabled=False):
        return _MixtureScores.apply(zn, hn, c, tau, dtype)


def mixture_scores_reference(zn: torch.Tensor, hn: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """The same quantity in plain autograd: the test oracle."""
    return (torch.exp(torch.einsum("bkd,md->bkm", zn, hn) / tau) * c.T.unsqueeze(0)).sum(1)
