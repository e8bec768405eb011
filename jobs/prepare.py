r"""Raw interactions -> a MultVAE-protocol dataset in the lake, on Ray Data.

Joins the running Ray cluster (RAY_ADDRESS, `ray start`, `ray job submit`) or starts a local Ray, then
reads the input files in parallel straight from object storage or local disk (only the columns it
needs), partitions the rows by user and splits them in parallel tasks: memory does not grow with the
input (see benchmarks/prepare.md). Input: a Parquet or CSV file or folder, a Delta table, or one of the
single-file formats (MovieLens, Netflix, LightGCN adjacency lists). Rows with a missing (NaN or null)
rating are dropped and counted in _meta.json ("input"); each (user, item) pair is kept once.

Examples:
  python jobs/prepare.py --synthetic --lake lake --name synthetic
  python jobs/prepare.py --input ../shared/data/ml-1m --lake lake --name ml-1m
  python jobs/prepare.py --input ../shared/data/gowalla --input ../shared/data/amazon-book-kgat \
      --heldout 5000 --lake lake --name gowalla-amazon
  python jobs/prepare.py --input events.parquet --user-col uid --item-col sku --lake lake --name shop
  python jobs/prepare.py --input lake/raw/scale/interactions --items lake/raw/scale/items \
      --vocabulary catalogue --heldout 10000 --lake lake --name scale
(the raw scale shards come from `python jobs/generate.py`, see benchmarks/scale.md)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from macrid.cluster import connect
from macrid.errors import ConfigError, MacridError, user_error
from macrid.data.prepare import prepare
from macrid.data.raw_input import sources_of
from macrid.data.formats import FORMATS
from macrid.data.readers import read_items
from macrid.data.split import Protocol
from macrid.data.synthetic import SyntheticSpec, generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", help="raw file or folder (u.data, ratings.dat[.gz], ratings.csv, "
                                     "Netflix training_set/, LightGCN train.txt/test.txt, or any .parquet/.csv); "
                                     "repeat it to prepare the union of several sources, ids prefixed by folder name")
    src.add_argument("--synthetic", action="store_true", help="generate planted-structure data instead")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="raw format (default: from the file name; a folder with _delta_log/ is a Delta table)")
    p.add_argument("--user-col", default="user_id", help="user column of a generic table")
    p.add_argument("--item-col", default="item_id", help="item column of a generic table")
    p.add_argument("--rating-col", default=None, help="rating column of a generic table (omit for implicit data)")
    p.add_argument("--lake", default="lake", help="lake root: a folder or s3://bucket/prefix (default: ./lake)")
    p.add_argument("--name", required=True, help="dataset name: written to <lake>/datasets/<name>")
    p.add_argument("--items", help="item table (Parquet/CSV file or folder): item_id, optional title and genres")
    p.add_argument("--vocabulary", default="train", choices=("train", "catalogue"),
                   help="train: items of the training users (MultVAE, default); catalogue: also every other "
                        "item of --items (or of the synthetic catalogue), so cold items get embeddings")
    p.add_argument("--min-rating", type=float, default=4.0, help="keep ratings >= this (default 4)")
    p.add_argument("--min-user-items", type=int, default=5, help="keep users with at least this many items")
    p.add_argument("--heldout", type=float, default=0.1,
                   help="validation and test users each: a fraction (<1) or a count (>=1); default 0.1")
    p.add_argument("--seed", type=int, default=98765, help="split seed (default 98765, as MultVAE)")
    p.add_argument("--overwrite", action="store_true", help="publish a new version of an existing dataset (runs keep reading the version they started on)")
    p.add_argument("--partitions", type=int, default=None,
                   help="user partitions of the shuffle (default: one per ~16 MB of input); the result is the "
                        "same for any number")
    p.add_argument("--local", action="store_true",
                   help="run every task in this process instead of on Ray (small inputs, debugging)")
    g = p.add_argument_group("synthetic data")
    helps = {"n_users": "users to generate", "n_items": "catalogue size M", "K": "planted categories",
             "factors": "latent factors within each category", "zipf": "popularity exponent within a category",
             "taste": "how strongly a user's factor taste drives choices", "min_items": "smallest user bag",
             "max_items": "largest user bag", "mean_items": "typical user bag (log-normal)",
             "max_user_categories": "most categories one user mixes (at least 2)", "seed": "generator seed"}
    for f in SyntheticSpec.__dataclass_fields__.values():
        g.add_argument(f"--syn-{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"{helps.get(f.name, '')} (default {f.default})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    try:
        protocol = Protocol(args.seed, args.min_rating, args.min_user_items, args.heldout,
                            vocabulary=args.vocabulary)
        if args.partitions is not None and args.partitions < 1:
            raise ConfigError(f"--partitions {args.partitions} must be at least 1")
        items = read_items(args.items, args.item_col) if args.items else None
        if args.synthetic:
            spec = SyntheticSpec(**{k: getattr(args, f"syn_{k}") for k in SyntheticSpec.__dataclass_fields__})
            raw = generate(spec)
        else:
            raw = sources_of(args.input, args.format, args.user_col, args.item_col, args.rating_col)
        if not args.local:
            connect(dashboard=False)
        meta = prepare(raw, args.lake, args.name, protocol, overwrite=args.overwrite, items=items,
                       partitions=args.partitions, runner="local" if args.local else "ray")
    except (MacridError, OSError) as e:
        if user_error(e) is None:  # a fault of the program, not of the input
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("name", "n_users", "n_items", "n_interactions_filtered", "train",
                                           "val", "test", "input")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
