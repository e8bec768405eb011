"""Step time and memory against catalogue size, and the DDP gradient exchange at 10^6 items.

  python benchmarks/scale.py steps --threads 2        # step time + peak RSS vs M, sampled vs full
  python benchmarks/scale.py ddp --items 1000000      # 2 CPU workers (gloo): dense DDP vs row-wise exchange
  python benchmarks/scale.py parts                    # three hot-path pieces against what they replaced

`steps` runs every (M, variant) in a fresh subprocess, so peak RSS is that configuration's alone:
- row-sparse: sampled softmax, item tables with sparse gradients and lazy Adam (the default),
  every user scored on C = the batch's items ∪ the S negatives (optim.candidates = "batch");
- per-user: the same, each user scored on its own items + the S negatives (optim.candidates = "user");
- dense: sampled softmax, dense item-table gradients and dense Adam (optim.row_sparse = false);
- full: full softmax over all M items (optim.negatives = 0).
Batches are synthetic bags (log-normal sizes around 40, items by a Zipf(0.8) popularity), the same
MacridVAE (K = 5, D = 100) and `macrid.training.train.train_step` that training runs. `ddp` starts two
processes with torch.distributed (gloo on loopback), as Ray Train's workers do, and times the same
step with the tables inside DDP (dense all-reduce) and outside it (macrid.model.row_sparse exchange).
Writes benchmarks/scale.json; benchmarks/scale.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def popularity(M: int) -> np.ndarray:
    return (np.arange(M) + 1.0) ** -0.8 * 1e6  # Zipf-like "training counts", most popular first


def batches(M: int, B: int, n: int, seed: int, pool: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """pool > 0: draw only among the `pool` most popular items, so batches hold the same items at any M."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(popularity(pool or M))
    out = []
    for _ in range(n):
        sizes = np.clip(rng.lognormal(np.log(40), 0.6, B), 10, 200).astype(np.int64)
        items = [np.unique(np.searchsorted(cdf, rng.random(s) * cdf[-1])) for s in sizes]
        off = np.concatenate([[0], np.cumsum([len(i) for i in items])])
        out.append((torch.from_numpy(np.concatenate(items)), torch.from_numpy(off)))
    return out


def setup(M: int, variant: str, S: int, D: int, K: int):
    from macrid.model.vae import MacridVAE
    from macrid.model.row_sparse import tables_of
    from macrid.model.sampling import NegativeSampler

    torch.manual_seed(0)
    row_sparse = variant in ("row-sparse", "per-user")
    model = MacridVAE(M, K=K, D=D, row_sparse=row_sparse).train()
    tables = tables_of(model, row_sparse)
    sampler = None if variant == "full" else NegativeSampler(popularity(M), S, alpha=0.75, seed=0)
    return model, tables, sampler


def one_config(M: int, variant: str, B: int, S: int, D: int, K: int, steps: int, warmup: int,
               pool: int = 0) -> dict:
    """Runs in its own process: median step seconds and peak RSS."""
    from macrid.model.row_sparse import Optimizers
    from macrid.training.step import objective_for, train_step

    model, tables, sampler = setup(M, variant, S, D, K)
    opt = Optimizers(model, tables, "adam", 1e-3, 0.0)
    data = batches(M, B, warmup + steps, seed=1, pool=pool)
    n_candidates = [len(sampler.candidates(idx).items) if sampler else M for idx, _ in data]
    times = []
    for i, (idx, off) in enumerate(data):
        t0 = time.perf_counter()
        train_step(model, opt, tables, objective_for("user" if variant == "per-user" else "batch", sampler), idx,
                   off, 0.2, 1)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"M": M, "variant": variant + (f", items from top {pool}" if pool else ""), "B": B, "S": S, "D": D, "K": K,
            "candidates": float(np.mean(n_candidates)), "step_s": float(np.median(times)),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def run_steps(args) -> list[dict]:
    sizes = (10_000, 100_000, 1_000_000)
    plan = [(M, v, 0) for M in sizes for v in ("row-sparse", "per-user", "dense")] + [(100_000, "full", 0)]
    plan += [(M, v, 10_000) for M in sizes for v in ("row-sparse", "per-user")]  # same batch items at every M
    if args.only_pool:
        plan = [p for p in plan if p[2]]
    rows = []
    for M, variant, pool in plan:
        code = (f"import json, sys, torch; sys.path.insert(0, {HERE!r}); torch.set_num_threads({args.threads});"
                f"import scale; print(json.dumps(scale.one_config({M}, {variant!r}, {args.batch}, {args.negatives},"
                f" {args.D}, {args.K}, {args.steps}, 3, {pool})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def ddp_worker(rank: int, world: int, port: int, args, variant: str, out: dict) -> None:
    import torch.distributed as dist

    from macrid.model.row_sparse import Optimizers
    from macrid.training.row_exchange import broadcast_tables, ignore_in_ddp
    from macrid.training.step import objective_for, train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, tables, sampler = setup(args.items, variant, args.negatives, args.D, args.K)
    if tables:
        ignore_in_ddp(model, tables)
        broadcast_tables(tables)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = Optimizers(model, tables, "adam", 1e-3, 0.0)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not any(p is t for t in tables))
    data = batches(args.items, args.batch // world, 2 + args.steps, seed=10 + rank)
    times, received = [], []
    for i, (idx, off) in enumerate(data):
        dist.barrier()
        t0 = time.perf_counter()
        _, _, got = train_step(ddp, opt, tables, objective_for("batch", sampler), idx, off, 0.2, world)
        if i >= 2:
            times.append(time.perf_counter() - t0)
            received.append(got)
    if rank == 0:
        out.update(variant=variant, M=args.items, world=world, step_s=float(np.median(times)),
                   dense_allreduce_mb=dense_bytes / 1e6, row_exchange_mb=float(np.mean(received)) / 1e6,
                   peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)
    dist.destroy_process_group()


def run_ddp(args) -> list[dict]:
    import torch.multiprocessing as mp

    rows = []
    for variant in ("row-sparse", "dense"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        manager = mp.Manager()
        out = manager.dict()
        mp.spawn(ddp_worker, args=(2, port, args, variant, out), nprocs=2, join=True)
        rows.append(dict(out))
        print(rows[-1], flush=True)
    return rows


def _median_time(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_parts(args) -> list[dict]:
    """Each replaced piece against its replacement, same inputs, same run (gowalla-like sizes)."""
    from macrid.training.evaluate import _merge_top_k
    from macrid.model.loss import own_items_nll

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    # 1. running top-k merge in chunked ranking: B = 1,000 users, a 13,421-item chunk + the running 100
    scores, items = torch.randn(1000, 13521, generator=g), torch.arange(13521).expand(1000, -1)

    def full_sort():
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :100]
        return torch.gather(scores, 1, order), torch.gather(items, 1, order)

    rows.append({"part": "top-k merge (1000 x 13,521)", "before": "full stable sort",
                 "after": "topk threshold + sort of k", "before_s": _median_time(full_sort),
                 "after_s": _median_time(lambda: _merge_top_k(scores[:, :0], items[:, :0], scores, 0, 100))})
    # 2. per-user positives, forward + backward: B = 500, K = 5, D = 100, N = 17,000 own items
    B, K, D, N, S = 500, 5, 100, 17000, 4098
    zn = torch.randn(B, K, D, requires_grad=True)
    h_own = torch.randn(N, D, requires_grad=True)
    user = torch.sort(torch.randint(0, B, (N,), generator=g)).values

    def gathered():
        torch.einsum("nkd,nd->nk", zn[user], h_own).sum().backward()

    def per_concept():
        torch.stack([(zn[:, k].index_select(0, user) * h_own).sum(1) for k in range(K)], 1).sum().backward()

    rows.append({"part": "own-item cosines, fwd + bwd (N = 17,000, K = 5, D = 100)",
                 "before": "(N, K, D) gather + batched matmul", "after": "one index_select per concept",
                 "before_s": _median_time(gathered), "after_s": _median_time(per_concept)})
    # 3. which shared negatives each user holds: B x S mask
    negatives = torch.unique(torch.randint(0, 40981, (S,), generator=g))
    indices = torch.randint(0, 40981, (N,), generator=g)
    off = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.bincount(user, minlength=B), 0)])
    n_keys = 40981

    def isin_mask():
        torch.isin(torch.arange(B).unsqueeze(1) * n_keys + negatives, user * n_keys + indices)

    log_neg = torch.randn(B, len(negatives))
    rows.append({"part": f"held-negative mask (B = 500, S = {len(negatives):,}, N = 17,000)",
                 "before": "isin over B x S keys", "after": "own_items_nll (searchsorted mask + the whole loss)",
                 "before_s": _median_time(isin_mask),
                 "after_s": _median_time(lambda: own_items_nll(torch.randn(N), log_neg, negatives,
                                                               torch.zeros(len(negatives)), indices, off))})
    for r in rows:
        r["speedup"] = r["before_s"] / r["after_s"]
        print(r, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("steps", "ddp", "parts"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=500, help="B users per step (global)")
    p.add_argument("--negatives", type=int, default=2000, help="S sampled negatives per batch")
    p.add_argument("--D", type=int, default=100)
    p.add_argument("--K", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only-pool", action="store_true", help="`steps`: only the same-items rows")
    p.add_argument("--items", type=int, default=1_000_000, help="M for `ddp`")
    args = p.parse_args()
    rows = {"steps": run_steps, "ddp": run_ddp, "parts": run_parts}[args.what](args)
    path = os.path.join(HERE, "scale.json")
    saved = json.load(open(path)) if os.path.exists(path) else {}
    key = args.what + ("-same-items" if args.only_pool else "")
    saved[key] = {"rows": rows, "args": vars(args), "machine": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    json.dump(saved, open(path, "w"), indent=1)


if __name__ == "__main__":
    main()
