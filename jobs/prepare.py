r"""Raw interactions -> a MultVAE-protocol dataset in the lake.

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
import dataclasses
import json
import os
import logging
import sys

from macrid.errors import MacridError
from macrid.data.prepare import prepare
from macrid.data.readers import FORMATS, read_items, read_raw, union
from macrid.data.split import Protocol
from macrid.data.synthetic import SyntheticSpec, generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", help="raw file or folder (u.data, ratings.dat[.gz], ratings.csv, "
                                     "Netflix training_set/, LightGCN train.txt/test.txt, or any .parquet/.csv); "
                                     "repeat it to prepare the union of several sources, ids prefixed by folder name")
    src.add_argument("--synthetic", action="store_true", help="generate planted-structure data instead")
    p.add_argument("--format", default="auto", choices=FORMATS, help="raw format (default: from the file name)")
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
        if args.synthetic:
            spec = SyntheticSpec(**{k: getattr(args, f"syn_{k}") for k in SyntheticSpec.__dataclass_fields__})
            raw = generate(spec)
        else:
            parts = [read_raw(i, args.format, args.user_col, args.item_col, args.rating_col) for i in args.input]
            names = [os.path.basename(os.path.normpath(i)) for i in args.input]
            raw = parts[0] if len(parts) == 1 else union(parts, names)
        if args.items:
            raw = dataclasses.replace(raw, items=read_items(args.items, args.item_col))
        protocol = Protocol(args.seed, args.min_rating, args.min_user_items, args.heldout,
                            vocabulary=args.vocabulary)
        meta = prepare(raw, args.lake, args.name, protocol, overwrite=args.overwrite)
    except MacridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("name", "n_users", "n_items", "n_interactions_filtered", "train",
                                           "val", "test")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
