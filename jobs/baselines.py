"""Closed-form baselines on a prepared dataset: item popularity and EASE (Steck 2019).

EASE's L2 weight is chosen on validation NDCG@100 from --lams; test is reported at that value.
  python jobs/baselines.py --lake lake --dataset ml-1m --lams 100,200,500,1000,2000
Writes <lake>/runs/<dataset>-<baseline>/metrics.json.
"""

from __future__ import annotations

import argparse
import sys

from macrid.model.baselines import ease_scorer, gram, popularity_scorer
from macrid.data.batches import load_dataset
from macrid.errors import MacridError, user_error
from macrid.training.evaluate import evaluate, scores_ranker
from macrid.data.lake import join, write_json
from macrid.data.layout import run_uri
from macrid.training.report import format_metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", default="lake", help="the lake: a local folder or s3://bucket/prefix (default: lake)")
    p.add_argument("--dataset", required=True, help="a dataset prepared by jobs/prepare.py: <lake>/datasets/<name>")
    p.add_argument("--lams", default="50,100,200,300,500,800,1000,1500,2000,3000",
                   help="comma-separated EASE L2 weights to try on validation")
    args = p.parse_args(argv)
    try:
        data = load_dataset(args.lake, args.dataset)
        G = gram(data.train, data.n_items)  # first: refused at once if EASE cannot fit in memory
        pop = scores_ranker(popularity_scorer(data.train, data.n_items))
        results = {"popularity": {"val": evaluate(pop, data.val, data.n_items),
                                  "test": evaluate(pop, data.test, data.n_items)}}
        sweep = []
        for lam in (float(x) for x in args.lams.split(",")):
            scorer = scores_ranker(ease_scorer(G, lam))
            val = evaluate(scorer, data.val, data.n_items)
            sweep.append((val["ndcg@100"][0], lam, val, scorer))
            print(f"EASE lam={lam:g}: val {format_metrics(val)}", flush=True)
        _, lam, val, scorer = max(sweep, key=lambda s: s[0])
        results["ease"] = {"lam": lam, "val": val, "test": evaluate(scorer, data.test, data.n_items),
                           "sweep": {str(s[1]): s[0] for s in sweep}}
    except (MacridError, OSError) as e:
        if user_error(e) is None:  # a fault of the program, not of the input
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    for name, r in results.items():
        write_json(join(run_uri(args.lake, f"{args.dataset}-{name}"), "metrics.json"),
                   {"dataset": args.dataset, "model": name, **r})
        print(f"{name}{' lam=' + format(r['lam'], 'g') if 'lam' in r else ''}: test {format_metrics(r['test'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
