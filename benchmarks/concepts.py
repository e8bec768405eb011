"""Macro disentanglement on real data: learned item concepts against genres, and concept usage (Fig. 2).

  python jobs/prepare.py --input ../shared/data/ml-100k --lake /tmp/lake --name ml-100k
  python benchmarks/concepts.py --lake /tmp/lake --dataset ml-100k --config configs/ml-100k.toml \
      --baseline configs/ml-100k-multvae.toml                       # raw output: concepts.json

Trains in this process (no Ray), one run each, on the dataset's split:
- `cosine`: MacridVAE as configured (Eq. 6 with cosine, the paper's model);
- `inner`: the same with inner product in Eq. 6 (`model.similarity='inner'`, the Fig. 2e ablation);
- `refine`: the same with the prototypes re-centred on k-means++ centres of h after epoch 10 and refined
  by one Lloyd step after every later epoch (`model.proto_init_epoch=10`, `model.proto_refine=true`);
- `multvae`: beta-MultVAE, whose item embeddings (the output layer, M x D) are clustered by spherical
  k-means++ into the same K groups: the two-stage baseline.

A `chance` row shuffles the `cosine` run's labels over the items (same concept sizes). For each: NMI, ARI and purity of the item labels against the first listed genre, any-genre purity
(macrid/output/alignment.py states the rule), the concept-usage entropy over ln K, the largest concept's
share, and test NDCG@100. A run folder that already holds metrics.json is reused (`--fresh` retrains).
The `cosine` run's Fig. 2-style item map goes to benchmarks/concepts-<dataset>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
import polars as pl
import torch

from macrid.config import load_config
from macrid.data import lake
from macrid.data.batches import snapshot_uri
from macrid.model.prototypes import spherical_kmeans
from macrid.output.alignment import genre_alignment, usage
from macrid.output.explain import Run
from macrid.output.html_report import item_map
from macrid.training.checkpoint import load_model
from macrid.training.train import eval_weights, run_in_process

VARIANTS = {"cosine": [], "inner": ["model.similarity='inner'"],
            "refine": ["model.proto_init_epoch=10", "model.proto_refine=true"]}


def train(args, name: str, config: str, extra: list[str]) -> str:
    run = f"concepts-{args.dataset}-{name}"
    done = os.path.exists(os.path.join(args.lake, "runs", run, "metrics.json"))
    if args.fresh or not done:
        import shutil

        shutil.rmtree(os.path.join(args.lake, "runs", run), ignore_errors=True)
        run_in_process(load_config(config, [f"data.lake={args.lake!r}", f"data.dataset={args.dataset!r}",
                                            f"run.name={run!r}", "run.progress=false", *extra, *args.set]))
    return run


def labels(args, run: str, K: int) -> tuple[np.ndarray, object]:
    model, saved = load_model(os.path.join(args.lake, "runs", run))
    model.load_state_dict(eval_weights(saved))  # the EMA average when the run kept one, as evaluation used
    with torch.no_grad():
        if hasattr(model, "m"):
            return model.concepts().argmax(1).numpy(), model
        centres = spherical_kmeans(model.h, K, seed=0)  # beta-MultVAE: the two-stage baseline
        return (torch.nn.functional.normalize(model.h, dim=1) @ centres.T).argmax(1).numpy(), model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--config", required=True, help="the MacridVAE config")
    p.add_argument("--baseline", required=True, help="the beta-MultVAE config")
    p.add_argument("--set", action="append", default=[], help="extra overrides for every run, e.g. optim.epochs=50")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already exist")
    p.add_argument("--out", default="benchmarks/concepts.json")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    K = load_config(args.config, [f"data.dataset={args.dataset!r}"]).model.K
    rows = {}
    for name, extra in [*VARIANTS.items(), ("multvae", None)]:
        run = train(args, name, args.baseline if extra is None else args.config, extra or [])
        learned, model = labels(args, run, K)
        metrics = lake.read_json(os.path.join(args.lake, "runs", run, "metrics.json"))
        version = lake.read_json(os.path.join(args.lake, "runs", run, "run.json"))["version"]
        snap = snapshot_uri(args.lake, args.dataset, version)
        items = pl.from_arrow(lake.read_table(lake.join(snap, "items"))).sort("item_idx")
        rows[name] = {"run": run, **genre_alignment(learned, items["genres"].to_list()), **usage(learned, K),
                      "test_ndcg@100": metrics["test"]["ndcg@100"][0], "val_ndcg@100": metrics["val"]["ndcg@100"][0]}
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "counts"}), flush=True)
        genres = items["genres"].to_list()
        if name == "cosine":
            chance_labels = learned
            r = Run(args.lake, run)
            hn = r.h / np.linalg.norm(r.h, axis=1, keepdims=True)
            genre = [g[0] if g else None for g in items["genres"].to_list()]
            item_map(hn, learned, genre, r).savefig(f"benchmarks/concepts-{args.dataset}.png", dpi=90)
    # chance: the cosine run's labels shuffled over the items (same concept sizes)
    shuffled = np.random.default_rng(0).permutation(chance_labels)
    rows["chance"] = {**genre_alignment(shuffled, genres), **usage(shuffled, K), "test_ndcg@100": float("nan")}
    out = json.load(open(args.out)) if os.path.exists(args.out) else {}
    out[args.dataset] = {"K": K, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "runs": rows,
                         "command": "python benchmarks/concepts.py " + " ".join(
                             f"--{k} {v}" for k, v in vars(args).items() if k in ("lake", "dataset", "config", "baseline"))}
    json.dump(out, open(args.out, "w"), indent=1)
    print("| variant | NMI | ARI | purity | any-genre purity | usage entropy / ln K | largest share | test NDCG@100 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['nmi']:.3f} | {r['ari']:.3f} | {r['purity']:.3f} | {r['any_genre_purity']:.3f} | "
              f"{r['entropy_ratio']:.3f} | {r['largest_share']:.3f} | {r['test_ndcg@100']:.4f} |")


if __name__ == "__main__":
    main()
