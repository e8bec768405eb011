"""The MacridVAE decoder's item scores with a hand-written, memory-lean backward.

    A[b, i] = sum_k c[i, k] * exp(cos(z_bk, h_i) / tau)          (decoder of Sec. 2.3)

Autograd would keep several B x K x M intermediates (the cosines, their
exponentials, the products with c). The function below keeps one, E = exp(S/tau),
and reuses it in place during the backward pass: about 5 passes over B x K x M
memory plus three GEMMs, which is what makes an epoch close to FLOP-bound on CPU.
Inputs must already be L2-normalised, so S is the cosine.
"""

from __future__ import annotations

import torch


class _MixtureScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zn: torch.Tensor, hn: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
        B, K, D = zn.shape
        zs = zn.reshape(B * K, D) * (1.0 / tau)  # fold 1/tau into the small operand: one pass less over E
        E = torch.mm(zs, hn.T)  # (B*K, M) cos/tau, which lies in [-1/tau, 1/tau]
        E.exp_()  # cannot overflow for tau >= 0.02
        E = E.view(B, K, -1)  # (B, K, M)
        cT = c.T.contiguous()  # (K, M)
        A = E[:, 0] * cT[0]  # (B, M)
        for k in range(1, K):
            A.addcmul_(E[:, k], cT[k])
        ctx.save_for_backward(zs, hn, cT, E)
        ctx.tau = tau
        return A

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gA: torch.Tensor):
        zs, hn, cT, E = ctx.saved_tensors
        B, K = E.shape[:2]
        D = zs.shape[1]
        G = E.mul_(gA.unsqueeze(1))  # (B, K, M) dL/dA * exp(S/tau), reusing E's memory (backward runs once)
        gc = G.sum(0).T if ctx.needs_input_grad[2] else None  # (M, K)
        G.mul_(cT.unsqueeze(0))  # (B, K, M) dL/d(S/tau)
        G2 = G.view(B * K, -1)
        gzn = (G2 @ hn).mul_(1.0 / ctx.tau).view(B, K, D) if ctx.needs_input_grad[0] else None  # (B, K, D)
        ghn = G2.T @ zs if ctx.needs_input_grad[1] else None  # (M, D); zs already carries the 1/tau
        return gzn, ghn, gc, None


def mixture_scores(zn: torch.Tensor, hn: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """zn (B, K, D), hn (M, D) unit-norm; c (M, K) concept weights -> A (B, M) > 0."""
    return _MixtureScores.apply(zn, hn, c, tau)


def mixture_scores_reference(zn: torch.Tensor, hn: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """The same quantity in plain autograd: the test oracle."""
    return (torch.exp(torch.einsum("bkd,md->bkm", zn, hn) / tau) * c.T.unsqueeze(0)).sum(1)
