"""MacridVAE training and evaluation throughput on one GPU, in fp32, tf32 and bf16.

    python benchmarks/gpu.py                      # on a GPU machine: both shapes, all precisions (< 8 min)
    python benchmarks/gpu.py --smoke              # tiny shapes on whatever device there is (tests use it)
    python benchmarks/gpu.py --check              # correctness first (gpu_check.py, < 3 min), then the figures

Shapes (planted data generated in memory, no lake):
- "ml20m": ~136,000 users x 20,000 items, ~70 items per user, full softmax (the ML-20M shape);
- "1m-items": 200,000 users x 10^6 items, sampled softmax (S negatives, per-user candidates, row-sparse tables).

Reports training users/s (steady state, after warm-up steps), evaluation users/s (fold-in ranking of
all items with the running top-k, at the row's precision, batches taken before the clock starts, after one
warm-up batch) and peak GPU memory of training and of evaluation, each measured on its own, as JSON (--out)
and a table. A row whose loss is not finite fails the run. Imports only
torch, numpy and pyarrow (through nothing here), so it runs on a bare GPU image with a stock PyTorch:
copy macrid/ beside it or install the project with `pip install --no-deps -e .`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_check.py

from macrid.config import ModelConfig  # noqa: E402
from macrid.training.evaluate import chunked_top_k  # noqa: E402
from macrid.model.vae import build_model  # noqa: E402
from macrid.model.row_sparse import Optimizers, tables_of  # noqa: E402
from macrid.model.sampling import NegativeSampler  # noqa: E402
from macrid.training.step import objective_for, precision_context, tf32_scope, train_step  # noqa: E402

SHAPES = {  # users, items, mean items per user, negatives (0 = full softmax), K categories planted
    "ml20m": dict(users=136_000, items=20_000, mean_len=70, negatives=0),
    "1m-items": dict(users=200_000, items=1_000_000, mean_len=40, negatives=8192),
}
SMOKE = {
    "ml20m": dict(users=600, items=300, mean_len=12, negatives=0),
    "1m-items": dict(users=600, items=5_000, mean_len=10, negatives=256),
}


def planted_bags(users: int, items: int, mean_len: int, K: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr (U+1,), indices (N,)) of users drawing items from one planted category, power-law popularity."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(mean_len) - 0.5, 1.0, users).astype(np.int64), 5, items // K)  # (U,)
    category_of_user = rng.integers(0, K, users)  # (U,)
    per_cat = items // K
    popularity = 1.0 / np.arange(1, per_cat + 1) ** 0.8
    cdf = np.cumsum(popularity) / popularity.sum()
    n = int(lengths.sum())
    user = np.repeat(np.arange(users), lengths)  # (N,)
    rank = np.minimum(np.searchsorted(cdf, rng.random(n)), per_cat - 1)  # (N,) popularity rank within a category
    item = category_of_user[user] * per_cat + rank
    keys = np.unique(user.astype(np.int64) * items + item)  # drop repeats within a bag; sorted by user
    user, item = keys // items, keys % items
    indptr = np.zeros(users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=users), out=indptr[1:])
    return indptr, item.astype(np.int64)


def take(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR rows -> (indices (N,), offsets (B+1,)) host tensors."""
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    row_of = np.repeat(np.arange(len(rows)), lengths)
    return torch.from_numpy(indices[starts[row_of] + np.arange(offsets[-1]) - offsets[:-1][row_of]]), \
        torch.from_numpy(offsets)


def batches(indptr, indices, batch: int, rng):
    order = rng.permutation(len(indptr) - 1)
    for lo in range(0, len(order) - batch + 1, batch):
        yield take(indptr, indices, order[lo:lo + batch])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_shape(name: str, shape: dict, precision: str, device, batch: int, steps: int, warmup: int,
              eval_users: int) -> dict:
    indptr, indices = planted_bags(shape["users"], shape["items"], shape["mean_len"])
    M, S = shape["items"], shape["negatives"]
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sampled = S > 0
    model = build_model(ModelConfig(K=7, D=100), M, row_sparse=sampled).to(device)
    tables = tables_of(model, sampled)
    opt = Optimizers(model, tables, "adam", 1e-3, 0.0)
    sampler = None
    if sampled:
        sampler = NegativeSampler(np.bincount(indices, minlength=M), S, 0.75, seed=0, device=device)
    autocast = precision_context(precision, device)
    rng = np.random.default_rng(0)
    it = iter(())
    done, users, t0, loss = 0, 0, None, None
    while done < warmup + steps:
        try:
            idx, off = next(it)
        except StopIteration:
            it = batches(indptr, indices, batch, rng)
            continue
        if done == warmup:
            sync(device)
            t0 = time.perf_counter()
        idx = idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx
        off = off.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else off
        with tf32_scope(precision, device):
            loss, _, _ = train_step(model, opt, tables, objective_for("user", sampler), idx, off, beta=0.2, world=1,
                                    autocast=autocast)
        done += 1
        if done > warmup:
            users += batch
    sync(device)
    train_s = time.perf_counter() - t0
    final_loss = float(loss.detach())
    train_peak = peak_gib(device)
    del opt, sampler  # evaluation's peak is its own: optimizer state and gradients are gone
    for p in model.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.eval()
    eval_rows = np.arange(min(eval_users, len(indptr) - 1))
    eval_batch = 1000 if M <= 100_000 else 250
    ready = [tuple(t.to(device) for t in take(indptr, indices, eval_rows[lo:lo + eval_batch]))
             for lo in range(0, len(eval_rows), eval_batch)]  # host work before the clock
    with torch.no_grad(), tf32_scope(precision, device), autocast():
        chunked_top_k(model, *ready[0], M, 100)  # warm-up
        sync(device)
        t1 = time.perf_counter()
        for idx, off in ready:
            chunked_top_k(model, idx, off, M, 100)
        sync(device)
    eval_s = time.perf_counter() - t1
    return {"shape": name, "precision": precision, "users": shape["users"], "items": M, "negatives": S,
            "interactions": int(len(indices)), "batch": batch, "steps_timed": steps, "final_loss": final_loss,
            "train_users_per_s": users / train_s, "step_ms": 1000 * train_s / steps,
            "eval_users_per_s": len(eval_rows) / eval_s, "train_peak_gpu_gib": train_peak,
            "eval_peak_gpu_gib": peak_gib(device)}


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few steps: checks the script on any device")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--precisions", nargs="*", default=["fp32", "tf32", "bf16"], choices=["fp32", "tf32", "bf16"])
    p.add_argument("--batch", type=int, default=1024, help="users per step")
    p.add_argument("--steps", type=int, default=60, help="timed steps per configuration (after 10 warm-up steps)")
    p.add_argument("--eval-users", type=int, default=10_000)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--check", action="store_true", help="run the correctness checks (gpu_check.py) first; stop "
                                                         "before the figures if one fails")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SMOKE if args.smoke else SHAPES
    batch, steps, warmup, eval_users = (64, 3, 1, 200) if args.smoke else (args.batch, args.steps, 10,
                                                                              args.eval_users)
    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    print(json.dumps(machine), flush=True)
    if args.check:
        from gpu_check import run_checks

        failed = run_checks(device, shapes, planted_bags, take, args.smoke)
        if failed:
            print(f"{len(failed)} check(s) failed: {failed}; no figures", flush=True)
            return 1
    rows = []
    for name in args.shapes:
        for precision in args.precisions:
            row = run_shape(name, shapes[name], precision, device, batch, steps, warmup, eval_users)
            rows.append(row)
            print(f"{name:9s} {precision:5s} train {row['train_users_per_s']:>10,.0f} users/s "
                  f"({row['step_ms']:.1f} ms/step)  eval {row['eval_users_per_s']:>9,.0f} users/s  "
                  f"peak train {row['train_peak_gpu_gib']:.2f} / eval {row['eval_peak_gpu_gib']:.2f} GiB  "
                  f"loss {row['final_loss']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "command": " ".join(sys.argv), "results": rows}, f, indent=1)
    bad = [f"{r['shape']}/{r['precision']}" for r in rows if not np.isfinite(r["final_loss"])]
    if bad:
        print(f"loss not finite in {bad}: these figures are not valid", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
