"""Soft concepts or their mode after training (issue 31, step 0): ML-1M NDCG@100 both ways, and how sharp c_i is.

  python benchmarks/mode_ranking.py --lake lake --run ml-1m-run      # a finished MacridVAE run
  python benchmarks/mode_ranking.py --lake lake --train              # prepare ml-1m and train configs/ml-1m.toml first
  python benchmarks/mode_ranking.py --lake lake --train --run sharp-gumbel --set model.gumbel=true \
      --out benchmarks/sharpen/gumbel.json                          # a variant of the config (what sharpens c_i?)

Three ways to score a finished model on the validation and test users (fold-in, all items ranked):
- soft: the trained decoder, A_ui = sum_k c_ik exp(cos(z_uk, h_i)/tau) (what training optimised, the default);
- mode (decoder): c_i replaced by the one-hot of its mode in the decoder only;
- mode (both): the one-hot mode in the encoder (Eq. 7's x_ui c_ik) and the decoder, as Sec. 2.2 reads
  ("we use the mode of p_theta(C) as C").
And the distribution of max_k c_ik over the catalogue. Prints a markdown table and writes mode_ranking.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from macrid.data.batches import load_dataset  # noqa: E402
from macrid.model.mixture import mixture_scores  # noqa: E402
from macrid.model.vae import item_concept  # noqa: E402
from macrid.training.evaluate import evaluate, model_ranker  # noqa: E402
from macrid.training.run_folder import RUN_FILE  # noqa: E402
from macrid.training.checkpoint import load_model  # noqa: E402


class ModeScored(torch.nn.Module):
    """A trained MacridVAE whose concepts are replaced by the one-hot of their mode (decoder, or both)."""

    def __init__(self, model, encoder_too: bool):
        super().__init__()
        self.model, self.encoder_too = model, encoder_too

    def one_hot(self, h: torch.Tensor) -> torch.Tensor:
        return F.one_hot(item_concept(self.model.concepts(h)), self.model.K).float()  # (C, K)

    @torch.no_grad()
    def represent(self, indices, offsets):
        m = self.model
        if not self.encoder_too:
            return m.represent(indices, offsets)
        items = torch.unique(indices)
        c = self.one_hot(m.h[items])
        return m.encode(indices, offsets, c[torch.searchsorted(items, indices)])[0]  # (B, K, D)

    @torch.no_grad()
    def score(self, mu, items):
        m = self.model
        h = m.h[items]  # (C, D)
        s = mixture_scores(F.normalize(mu, dim=-1), F.normalize(h, dim=1), self.one_hot(h), m.tau).log()
        return s if m.item_bias is None else s + m.item_bias[items]  # (B, C)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", default="lake")
    p.add_argument("--run", default="mode-ml-1m")
    p.add_argument("--train", action="store_true", help="prepare ml-1m and train configs/ml-1m.toml as --run first")
    p.add_argument("--data", default=os.environ.get("MACRID_DATA", os.path.join(ROOT, "..", "shared", "data")))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "mode_ranking.json"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --train: override configs/ml-1m.toml, e.g. model.tau=0.05 (repeatable)")
    args = p.parse_args()
    t0 = time.perf_counter()
    if args.train:
        from macrid.config import load_config
        from macrid.data.layout import is_dataset
        from macrid.data.prepare import prepare
        from macrid.data.readers import read_raw
        from macrid.data.split import Protocol
        from macrid.training.launch import prepare_config
        from macrid.training.train import run_in_process

        if not is_dataset(args.lake, "ml-1m"):
            prepare(read_raw(os.path.join(args.data, "ml-1m")), args.lake, "ml-1m", Protocol())
        run_in_process(prepare_config(load_config(os.path.join(ROOT, "configs", "ml-1m.toml"), [
            f"data.lake={args.lake!r}", f"run.name={args.run!r}", "run.progress=false", *args.set])))
    run = os.path.join(args.lake, "runs", args.run)
    model, saved = load_model(run)
    record = json.load(open(os.path.join(run, RUN_FILE)))
    data = load_dataset(args.lake, record["dataset"], with_train=False, version=record["version"])
    rows = {}
    for name, ranked in (("soft (trained decoder)", model), ("mode, decoder only", ModeScored(model, False)),
                         ("mode, encoder and decoder", ModeScored(model, True))):
        rows[name] = {split: evaluate(model_ranker(ranked, data.n_items), held, data.n_items)["ndcg@100"]
                      for split, held in (("val", data.val), ("test", data.test))}
    with torch.no_grad():
        top = model.concepts().max(1).values.numpy()  # (M,)
    sharp = {"median": float(np.median(top)), "p90": float(np.quantile(top, 0.9)),
             "share_above_0.9": float((top > 0.9).mean()), "share_below_0.6": float((top < 0.6).mean()),
             "items": int(len(top))}
    out = {"command": "python benchmarks/mode_ranking.py " + " ".join(sys.argv[1:]), "run": args.run, "set": args.set,
           "epoch": saved["epoch"], "ndcg@100": rows, "max_c": sharp, "seconds": round(time.perf_counter() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("| scoring | val NDCG@100 | test NDCG@100 |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['val'][0]:.4f} ± {r['val'][1]:.4f} | {r['test'][0]:.4f} ± {r['test'][1]:.4f} |")
    print(f"\nmax_k c_ik over {sharp['items']} items: median {sharp['median']:.3f}, 90th percentile {sharp['p90']:.3f}, "
          f"{100 * sharp['share_above_0.9']:.1f}% above 0.9, {100 * sharp['share_below_0.6']:.1f}% below 0.6")
    return 0


if __name__ == "__main__":
    sys.exit(main())
