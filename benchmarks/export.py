"""Export throughput on CPU: users/s per core for components only and with top-100, against the matmul bound.

  python jobs/prepare.py --input ../shared/data/ml-1m --lake /tmp/lake --name ml-1m
  python benchmarks/export.py --lake /tmp/lake --dataset ml-1m --lake /work/big/lake --dataset scale
      (pairs: --lake L1 --dataset D1 --lake L2 --dataset D2)          # raw output: export.json

Per dataset, in one process with 1 thread (per core): the export's compute (`represent.users`) on
the dataset's training users in batches of 2,000, components only and with top-100, for a MacridVAE
of the shipped shape (K = 7, D = 100) over the dataset's M items. Weights are random: the cost does
not depend on their values. The matmul bound is measured in the same run: `torch.mm` of the scoring's
own shape (B·K × D by D × chunk), and the FLOP count of top-N scoring is 2·K·D·M per user (the
cosines; the exp, the concept mix and the top-k merge are extra work the bound does not count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from macrid.data.batches import load_dataset
from macrid.training.evaluate import SCORE_BUDGET
from macrid.model.vae import MacridVAE
from macrid.output import represent

K, D, BATCH, TOP = 7, 100, 2000, 100


def users_per_s(model, csr, rows, top_n) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        idx, off = csr.take(rows[start:start + BATCH])
        represent.users(model, idx, off, top_n)
    return len(rows) / (time.perf_counter() - t0)


def matmul_gflops(rows: int, chunk: int, repeats: int = 5) -> float:
    a, b = torch.randn(rows, D), torch.randn(D, chunk)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * rows * D * chunk * repeats / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", action="append", required=True)
    p.add_argument("--dataset", action="append", required=True)
    p.add_argument("--users", type=int, default=20000, help="users timed, components only")
    p.add_argument("--top-users", type=int, default=2000, help="users timed with top-100")
    p.add_argument("--out", default="benchmarks/export.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 thread", "rows": {}}
    for lake_root, name in zip(args.lake, args.dataset, strict=True):
        data = load_dataset(lake_root, name)
        model = MacridVAE(data.n_items, K=K, D=D).eval()
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(data.train.n_rows, min(args.users, data.train.n_rows), replace=False))
        top_rows = rows[:args.top_users]
        users_per_s(model, data.train, rows[:BATCH], 0)  # warm-up
        comp = users_per_s(model, data.train, rows, 0)
        top = users_per_s(model, data.train, top_rows, TOP)
        chunk = max(1024, SCORE_BUDGET // (BATCH * K))
        bound_gflops = matmul_gflops(BATCH * K, min(chunk, data.n_items))
        achieved = 2 * K * D * data.n_items * top / 1e9
        row = {"items": data.n_items, "users_timed": len(rows), "top_users_timed": len(top_rows),
               "components_users_per_s": comp, "top100_users_per_s": top, "matmul_gflops": bound_gflops,
               "top100_scoring_gflops": achieved, "fraction_of_matmul_bound": achieved / bound_gflops,
               "top100_bound_users_per_s": bound_gflops * 1e9 / (2 * K * D * data.n_items)}
        out["rows"][name] = row
        print(name, json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
