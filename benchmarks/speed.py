"""Epoch time against the FLOP bound of this machine, on ML-1M (K=7, d=100, batch 500).

In one run it measures:
1. the float32 matmul peak: the best GFLOP/s over large square GEMMs, and the GEMM rate at the
   decoder's own shape (B*K x D) @ (D x M), which bounds what any layout of this model can reach;
2. the matmul FLOPs of one training epoch, counted from the real batches;
3. the median training-epoch time of MacridVAE with the fused decoder (macrid.model.mixture) and with
   the plain-autograd decoder (the baseline).

  python benchmarks/speed.py --lake lake --dataset ml-1m --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

import macrid.model.vae as model_mod
from macrid.data.batches import iter_batches, load_dataset
from macrid.model.loss import elbo_loss, multinomial_nll
from macrid.model.mixture import mixture_scores, mixture_scores_reference


def gemm_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def epoch_flops(batches, M: int, K: int, D: int) -> float:
    """Matmul FLOPs of one epoch: forward + backward (x3) of every product in the model."""
    total = 0.0
    for idx, off in batches:
        B, N = len(off) - 1, len(idx)
        decoder = 2 * B * K * M * D  # cos(z_k, h_i) for all users, concepts, items
        encoder = 2 * N * K * D  # the sparse bag sum of c_ik * t_i
        f_nn = 2 * B * K * D * 2 * D
        concepts = 2 * M * K * D  # cos(h_i, m_k)
        total += 3 * (decoder + encoder + f_nn + concepts)
    return total


def time_epochs(data, K: int, D: int, batch_size: int, epochs: int, decoder) -> list[float]:
    model_mod.mixture_scores = decoder  # swap the decoder implementation under test
    torch.manual_seed(0)
    model = model_mod.MacridVAE(data.n_items, K=K, D=D)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for epoch in range(epochs + 1):  # the first epoch warms up allocators and is dropped
        t = time.perf_counter()
        for idx, off in iter_batches(data.train, batch_size, np.random.default_rng(epoch)):
            out = model.score_all(idx, off)
            loss, _ = elbo_loss(multinomial_nll(out.log_scores, idx, off), out.kl, off, 0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t)
    model_mod.mixture_scores = mixture_scores
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", default="lake")
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--K", type=int, default=7)
    p.add_argument("--D", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=500)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.lake, args.dataset)
    M, K, D, B = data.n_items, args.K, args.D, args.batch_size

    peak = max(gemm_rate(n, n, n) for n in (2048, 3072, 4096))
    shape_rate = gemm_rate(B * K, D, M)
    flops = epoch_flops(list(iter_batches(data.train, B)), M, K, D)
    fused = time_epochs(data, K, D, B, args.epochs, mixture_scores)
    plain = time_epochs(data, K, D, B, args.epochs, mixture_scores_reference)
    bound = flops / (peak * 1e9)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "dataset": args.dataset, "M": M, "K": K, "D": D, "batch_size": B,
        "matmul_peak_gflops": peak, "decoder_shape_gemm_gflops": shape_rate,
        "epoch_gflop": flops / 1e9, "flop_bound_seconds": bound,
        "fused_epoch_seconds": float(np.median(fused)), "plain_autograd_epoch_seconds": float(np.median(plain)),
        "fused_ratio_to_bound": float(np.median(fused)) / bound,
        "plain_ratio_to_bound": float(np.median(plain)) / bound,
        "fused_ratio_to_shape_bound": float(np.median(fused)) / (flops / (shape_rate * 1e9)),
        "speedup_fused_over_plain": float(np.median(plain) / np.median(fused)),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
