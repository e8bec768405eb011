"""Rounding error of the decoder's mixture under bf16 autocast against fp32, on random unit vectors.

  python benchmarks/bf16_error.py       # B = 256 users, K = 7, D = 100, M = 5,000 items, tau = 0.1
"""

import torch
import torch.nn.functional as F

from macrid.model.mixture import mixture_scores

torch.manual_seed(0)
B, K, D, M, tau = 256, 7, 100, 5000, 0.1
zn = F.normalize(torch.randn(B, K, D), dim=-1)  # (B, K, D)
hn = F.normalize(torch.randn(M, D), dim=-1)  # (M, D)
c = torch.softmax(3 * torch.randn(M, K), 1)  # (M, K) peaked concept weights
exact = mixture_scores(zn, hn, c, tau)  # (B, M) fp32
with torch.autocast("cpu", dtype=torch.bfloat16):
    rounded = mixture_scores(zn, hn, c, tau)
rel = ((rounded - exact).abs() / exact).flatten()
lse = (torch.logsumexp(rounded.log(), 1) - torch.logsumexp(exact.log(), 1)).abs()
print(f"A_ui relative error: median {rel.median():.4f}, p99 {rel.kthvalue(int(0.99 * len(rel))).values:.4f}, "
      f"max {rel.max():.4f}; log-sum-exp over items: max abs error {lse.max():.5f} nats")
