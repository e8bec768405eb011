"""Micro disentanglement against accuracy (the paper's Fig. 4): independence vs NDCG@100 over beta and sigma0.

  python jobs/prepare.py --input ../shared/data/ml-100k --lake /tmp/lake --name ml-100k
  python benchmarks/fig4.py --lake /tmp/lake --dataset ml-100k --configs 8 --set optim.epochs=60
      # raw output: fig4.json; figure: fig4-<dataset>.png

Three methods, each trained on the same `--configs` random draws (seeded) in this process:
- MacridVAE with K = 7 and with K = 1 (configs/<dataset>.toml otherwise): beta log-uniform in
  [0.02, 2], sigma0 log-uniform in [0.03, 0.3];
- beta-MultVAE (configs/<dataset>-multvae.toml): the same beta draws (it has no sigma0).
Independence is Sec. 3.4's 1 - mean |corr| over pairs of dimensions of the test users' representations
(each of MacridVAE's K components counts as one d-dimensional sample). The paper drew 2,000
configurations per method; this draws a handful, so read the figure as a sketch of the trend.
A run folder that already holds metrics.json is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil

import numpy as np
import torch

from macrid.config import load_config
from macrid.data import lake
from macrid.training.train import run_in_process

METHODS = {"MacridVAE K=7": ("{d}.toml", ["model.K=7"]), "MacridVAE K=1": ("{d}.toml", ["model.K=1"]),
           "beta-MultVAE": ("{d}-multvae.toml", [])}


def draws(n: int, seed: int = 0) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    return [(float(np.exp(rng.uniform(np.log(0.02), np.log(2.0)))), float(np.exp(rng.uniform(np.log(0.03), np.log(0.3)))))
            for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", required=True)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--configs", type=int, default=8, help="random (beta, sigma0) draws per method")
    p.add_argument("--set", action="append", default=[], help="overrides for every run, e.g. optim.epochs=60")
    p.add_argument("--out", default="benchmarks/fig4.json")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    rows = []
    for method, (config, extra) in METHODS.items():
        for i, (beta, sigma0) in enumerate(draws(args.configs)):
            run = f"fig4-{args.dataset}-{method.split()[-1].lower().replace('=', '')}-{i}"
            folder = os.path.join(args.lake, "runs", run)
            knobs = [f"optim.beta={beta}"] + ([f"model.sigma0={sigma0}"] if "Macrid" in method else [])
            if not os.path.exists(os.path.join(folder, "metrics.json")):
                shutil.rmtree(folder, ignore_errors=True)
                run_in_process(load_config(f"configs/{config.format(d=args.dataset)}", [
                    f"data.lake={args.lake!r}", f"data.dataset={args.dataset!r}", f"run.name={run!r}",
                    "run.progress=false", *extra, *knobs, *args.set]))
            m = lake.read_json(os.path.join(folder, "metrics.json"))
            rows.append({"method": method, "run": run, "beta": beta, "sigma0": sigma0 if "Macrid" in method else None,
                         "val_ndcg@100": m["val"]["ndcg@100"][0], "test_ndcg@100": m["test"]["ndcg@100"][0],
                         "independence": m["test"]["independence"]})
            print(json.dumps(rows[-1]), flush=True)
    json.dump({"dataset": args.dataset, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "command": f"python benchmarks/fig4.py --lake {args.lake} --dataset {args.dataset} --configs "
                          f"{args.configs}" + "".join(f" --set {s}" for s in args.set), "runs": rows},
              open(args.out, "w"), indent=1)
    plot(rows, f"benchmarks/fig4-{args.dataset}.png")
    print("| method | runs | independence: mean (min-max) | best val NDCG@100 | its test NDCG@100 | its independence |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        ind = np.array([r["independence"] for r in mine])
        best = max(mine, key=lambda r: r["val_ndcg@100"])
        print(f"| {method} | {len(mine)} | {ind.mean():.3f} ({ind.min():.3f}-{ind.max():.3f}) | "
              f"{best['val_ndcg@100']:.4f} | {best['test_ndcg@100']:.4f} | {best['independence']:.3f} |")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for method, marker in zip(METHODS, "o^s"):
        mine = [r for r in rows if r["method"] == method]
        axes[0].scatter([r["independence"] for r in mine], [r["test_ndcg@100"] for r in mine], marker=marker,
                        label=method)
        axes[1].scatter([r["beta"] for r in mine], [r["val_ndcg@100"] for r in mine], marker=marker, label=method)
        if "Macrid" in method:
            axes[2].scatter([r["sigma0"] for r in mine], [r["val_ndcg@100"] for r in mine], marker=marker, label=method)
    axes[0].set(xlabel="independence (test users)", ylabel="test NDCG@100", title="micro disentanglement vs accuracy")
    axes[1].set(xscale="log", xlabel="beta", ylabel="val NDCG@100")
    axes[2].set(xscale="log", xlabel="sigma0", ylabel="val NDCG@100")
    for a in axes:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
