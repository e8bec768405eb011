"""The nightly loop, measured: the stale model, a warm start and a run from scratch, day after day.

  python benchmarks/nightly.py                      # planted lake (6 days) and ml-1m (5 time windows)
  python benchmarks/nightly.py --only planted --days 6 --epochs 20

Every day d (from the second on): a new dataset version from that day's input; three models scored on its
test users, by item ID (macrid.training.promote.ranked_by_id: each model folds users in from the items it
knows; an item it does not know is a miss):
- stale: yesterday's production model, not retrained (it cannot recommend today's new items);
- warm: a warm start from yesterday's production model, --epochs / 4 epochs (then production for tomorrow);
- scratch: a run from fresh weights, --epochs epochs.
Per model: test NDCG@100, Recall@50 on held-out interactions with items that are new that day, the share of
new items among the top-100, wall time and epochs. On planted data: NMI of the concepts (argmax c_i) of
the new items and of the carried items against their planted categories, at the warm start (before its
first step) and after it; concept stability = the share of carried items whose argmax concept is the same
in the warm model as in its parent. Writes benchmarks/nightly.json and prints the markdown table of nightly.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import polars as pl
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from macrid.config import load_config  # noqa: E402
from macrid.data import lake as lakeio  # noqa: E402
from macrid.data.batches import load_dataset  # noqa: E402
from macrid.data.daily import DailySpec, day_uri, write_days  # noqa: E402
from macrid.data.prepare import prepare  # noqa: E402
from macrid.data.raw_input import Source  # noqa: E402
from macrid.data.readers import read_items  # noqa: E402
from macrid.data.split import Protocol  # noqa: E402
from macrid.training.launch import prepare_config  # noqa: E402
from macrid.training.metrics import ndcg_at_k, nmi, targets_mask  # noqa: E402
from macrid.training.promote import ranked_by_id  # noqa: E402
from macrid.training.run_folder import read_vocabulary  # noqa: E402
from macrid.training.checkpoint import load_model
from macrid.training.train import run_in_process  # noqa: E402
from macrid.training.warm_start import INITIAL_FILE  # noqa: E402


WARM_SETS: list[str] = []  # --warm-set: overrides for the warm runs only (variants in nightly.md)


def config(lake, dataset, run, epochs, warm="", **model):
    sets = [f"data.lake={lake!r}", f"data.dataset={dataset!r}", f"run.name={run!r}", f"optim.epochs={epochs}",
            "run.progress=false", "model.K=5", "model.D=64", "optim.batch_size=500", "optim.lr=2e-3",
            "optim.beta=0.2", "optim.anneal_epochs=3", "model.proto_init_epoch=3", "model.proto_refine=true"]
    sets += [f"model.{k}={v!r}" for k, v in model.items()]
    if warm:
        sets += [f"run.warm_start={warm!r}", *WARM_SETS]
    return load_config(None, sets)


def train(cfg) -> tuple[dict, float]:
    t0 = time.perf_counter()
    metrics = run_in_process(prepare_config(cfg))
    return metrics, time.perf_counter() - t0


def score(lake, run, ids, split, new_mask) -> dict:
    """Test metrics of `run` on the day's test users (item indices of the day's vocabulary `ids`)."""
    ranked = ranked_by_id(lake, run, ids, split.foldin, 100)  # (U, 100), len(ids) = unknown
    M = len(ids)
    idx, ptr = split.heldout.indices, split.heldout.indptr
    n_targets = np.diff(ptr)
    hits = targets_mask(torch.from_numpy(ranked), torch.as_tensor(idx.copy()), torch.as_tensor(ptr.copy()), M + 1)
    ndcg = ndcg_at_k(hits, torch.from_numpy(n_targets), 100).numpy()
    # Recall@50 on held-out interactions with today's new items: users with at least one such target
    is_new = np.append(new_mask, False)
    new_target = is_new[idx]  # (T,)
    user_of = np.repeat(np.arange(len(n_targets)), n_targets)
    n_new = np.bincount(user_of[new_target], minlength=len(n_targets))
    hit_new = hits[:, :50].numpy() & is_new[ranked[:, :50]]
    has = n_new > 0
    recall_new = hit_new.sum(1)[has] / np.minimum(50, n_new[has])
    return {"ndcg@100": float(ndcg.mean()), "ndcg_se": float(ndcg.std() / np.sqrt(len(ndcg))),
            "recall@50_new": float(recall_new.mean()) if has.any() else float("nan"),
            "users_with_new_targets": int(has.sum()), "new_share@100": float(is_new[ranked].mean())}


def concepts_of(lake, run, weights=None) -> np.ndarray:
    """argmax c_i of every item of the run's vocabulary (evaluation mode), or of the given state dict."""
    model, saved = load_model(lakeio.join(lake, "runs", run))
    if weights is not None:
        model.load_state_dict(weights)
    with torch.no_grad():
        return model.concept_logits().argmax(1).numpy()


def run_days(name, lake, days, inputs, epochs, truth=None) -> list[dict]:
    """inputs(d) -> (sources, items) of day d; truth: item_id (str) -> planted category, or None."""
    rows, prod = [], None
    for d in range(1, days + 1):
        sources, items = inputs(d)
        prepare(sources, lake, name, Protocol(), overwrite=True, items=items)
        data = load_dataset(lake, name, with_train=False)
        vocab = pl.from_arrow(lakeio.read_table(f"{lake}/datasets/{name}/versions/{data.meta['version']}/items",
                                                ["item_idx", "item_id"])).sort("item_idx")
        ids = vocab["item_id"].to_arrow()
        scratch_run = f"{name}-d{d}-scratch"
        scratch, t_scratch = train(config(lake, name, scratch_run, epochs))
        if prod is None:
            prod = scratch_run
            print(f"[{name}] day {d}: from scratch {scratch['test']['ndcg@100'][0]:.4f} ({t_scratch:.0f} s)", flush=True)
            continue
        parent_ids = {str(v) for v in read_vocabulary(lake, prod)["item_id"].to_pylist()}
        new_mask = ~np.isin(np.array([str(v) for v in vocab["item_id"].to_list()]), list(parent_ids))
        warm_run = f"{name}-d{d}-warm"
        warm, t_warm = train(config(lake, name, warm_run, max(1, epochs // 4), warm=prod))
        row = {"dataset": name, "day": d, "items": len(ids), "new_items": int(new_mask.sum()),
               "new_share_of_catalogue": float(new_mask.mean()), "dropped_items": warm["parent"]["items"]["dropped"]}
        for label, run, secs, m in (("stale", prod, 0.0, None), ("warm", warm_run, t_warm, warm),
                                    ("scratch", scratch_run, t_scratch, scratch)):
            row[label] = score(lake, run, ids, data.test, new_mask) | {
                "seconds": round(secs, 1), "epochs": m["epochs_run"] if m else 0,
                "best_epoch": m["best_epoch"] if m else None}
        # concepts: stability of the carried items, and planted NMI at the warm start and after it
        parent_vocab = [str(v) for v in read_vocabulary(lake, prod)["item_id"].to_pylist()]
        parent_concept = dict(zip(parent_vocab, concepts_of(lake, prod)))
        child_ids = [str(v) for v in vocab["item_id"].to_list()]
        initial = torch.load(f"{lake}/runs/{warm_run}/{INITIAL_FILE}", weights_only=True)
        at_start = concepts_of(lake, warm_run, initial["model"])
        after = concepts_of(lake, warm_run)
        carried = [i for i, item in enumerate(child_ids) if item in parent_concept]
        row["concept_stability"] = float(np.mean([after[i] == parent_concept[child_ids[i]] for i in carried]))
        row["concept_stability_at_start"] = float(np.mean([at_start[i] == parent_concept[child_ids[i]]
                                                           for i in carried]))
        if truth is not None:
            new = np.flatnonzero(new_mask)
            planted = np.array([truth[i] for i in child_ids])
            row["nmi_new_at_start"] = nmi(at_start[new], planted[new])
            row["nmi_new"] = nmi(after[new], planted[new])
            row["nmi_carried"] = nmi(after[carried], planted[carried])
        rows.append(row)
        print(f"[{name}] day {d}: " + json.dumps({k: row[k] for k in ("stale", "warm", "scratch")}), flush=True)
        prod = warm_run  # the nightly loop: tonight's warm start is production tomorrow
    return rows


def planted(tmp, days, epochs) -> list[dict]:
    spec = DailySpec(days=days, n_users=4000, n_items=2000, K=5, mean_items=15.0, new_items=0.08, retire=0.03,
                     window=2, seed=7)
    raw = f"{tmp}/planted-raw"
    write_days(spec, raw)
    catalogue = pl.read_parquet(f"{raw}/catalogue.parquet")
    truth = dict(zip(catalogue["item_id"].cast(pl.String).to_list(), catalogue["category"].to_list()))

    def inputs(d):
        folder = day_uri(raw, d)
        return [Source(f"{folder}/interactions")], read_items(f"{folder}/items")
    return run_days("planted", f"{tmp}/lake", days, inputs, epochs, truth)


def movielens(tmp, windows, epochs, data_dir) -> list[dict]:
    """ml-1m's users 1-2999 with timestamps, split by time into `windows` windows of equal event counts; day d's
    dataset is window d's ratings (>= 4 kept by prepare, as always)."""
    path = os.path.join(data_dir, "ml-1m", "ratings_prefix_users1-2999_with_timestamps.dat.gz")
    # UserID::MovieID::Rating::Timestamp; "::" read as ":" leaves empty columns between the fields
    df = pl.read_csv(path, separator=":", has_header=False).select(
        pl.nth(0).alias("user_id"), pl.nth(2).alias("item_id"), pl.nth(4).cast(pl.Float64).alias("rating"),
        pl.nth(6).alias("ts")).sort("ts")
    edges = np.linspace(0, df.height, windows + 1).astype(int)
    for d in range(1, windows + 1):
        part = df.slice(edges[d - 1], edges[d] - edges[d - 1])
        lakeio.write_parquet(f"{tmp}/ml1m-raw/w{d}/part-0.parquet", part.drop("ts").to_arrow())

    def inputs(d):
        return [Source(f"{tmp}/ml1m-raw/w{d}", rating_col="rating")], None
    return run_days("ml-1m-time", f"{tmp}/lake", windows, inputs, epochs)


def table(rows: list[dict]) -> str:
    head = ("| data | day | new items | model | test NDCG@100 | Recall@50 new items | new share of top-100 | "
            "seconds | epochs |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        for label in ("stale", "warm", "scratch"):
            m = r[label]
            lines.append(f"| {r['dataset']} | {r['day']} | {r['new_items']} ({100 * r['new_share_of_catalogue']:.1f}%) | "
                         f"{label} | {m['ndcg@100']:.4f} ± {m['ndcg_se']:.4f} | {m['recall@50_new']:.4f} | "
                         f"{m['new_share@100']:.3f} | {m['seconds']} | {m['epochs']} |")
    lines += ["", "| data | day | carried items keeping their concept (at the start / after) | NMI new items (at the start / "
              "after) | NMI carried items | warm / scratch NDCG@100 | warm epochs / scratch epochs |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        nmis = (f"{r['nmi_new_at_start']:.3f} / {r['nmi_new']:.3f} | {r['nmi_carried']:.3f}" if "nmi_new" in r
                else "n/a | n/a")
        lines.append(f"| {r['dataset']} | {r['day']} | {r['concept_stability_at_start']:.3f} / {r['concept_stability']:.3f} | "
                     f"{nmis} | {r['warm']['ndcg@100'] / r['scratch']['ndcg@100']:.3f} | "
                     f"{r['warm']['epochs']} / {r['scratch']['epochs']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("planted", "ml-1m"), help="one of the two datasets")
    p.add_argument("--days", type=int, default=6, help="planted days (default 6)")
    p.add_argument("--windows", type=int, default=5, help="ml-1m time windows (default 5)")
    p.add_argument("--epochs", type=int, default=20, help="from-scratch epochs; the warm start runs a quarter")
    p.add_argument("--data", default=os.environ.get("MACRID_DATA", os.path.join(ROOT, "..", "shared", "data")))
    p.add_argument("--warm-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override for the warm starts only (a variant), e.g. model.proto_refine=false")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "nightly.json"))
    args = p.parse_args()
    WARM_SETS.extend(args.warm_set)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="macrid-nightly-") as tmp:
        if args.only in (None, "planted"):
            rows += planted(tmp, args.days, args.epochs)
        if args.only in (None, "ml-1m"):
            rows += movielens(tmp, args.windows, args.epochs, args.data)
    result = {"command": "python benchmarks/nightly.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                         f"{torch.__version__}", "seconds": round(time.perf_counter() - t0, 1),
              "warm_sets": args.warm_set, "epochs_scratch": args.epochs, "epochs_warm": max(1, args.epochs // 4), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
