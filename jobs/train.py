"""Train MacridVAE (or a Mult* baseline) on a prepared dataset with Ray Train.

With no arguments it trains on the offline synthetic dataset in ./lake,
generating it first if it is missing. Examples:
  python jobs/train.py
  python jobs/train.py --config configs/ml-1m.toml
  python jobs/train.py --config configs/ml-1m.toml --set optim.epochs=5 --set model.name=multvae
  ray job submit -- python jobs/train.py --config configs/ml-1m.toml
Outputs go to <lake>/runs/<run>/: checkpoints/, metrics.json, learning_curve.png.
"""

from __future__ import annotations

import argparse
import os
import sys

from macrid.config import load_config
from macrid.errors import MacridError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="TOML config (default: configs/synthetic.toml if present)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--in-process", action="store_true", help="run the worker loop in this process, without Ray")
    args = p.parse_args(argv)
    path = args.config
    if path is None and os.path.exists("configs/synthetic.toml"):
        path = "configs/synthetic.toml"
    try:
        cfg = load_config(path, args.set)
        _ensure_default_dataset(cfg)
        if args.in_process:
            import dataclasses
            import time

            from macrid.train import fit

            if not cfg.run.name:
                cfg = dataclasses.replace(cfg, run=dataclasses.replace(
                    cfg.run, name=f"{cfg.data.dataset}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
            fit(cfg)
        else:
            from macrid.train import launch

            launch(cfg)
    except MacridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _ensure_default_dataset(cfg) -> None:
    """The embedded default: generate the synthetic dataset offline the first time it is needed."""
    from macrid import lake
    from macrid.prepare import dataset_uri, prepare
    from macrid.split import Protocol
    from macrid.synthetic import SyntheticSpec, generate

    if cfg.data.dataset == "synthetic" and not lake.exists(dataset_uri(cfg.data.lake, "synthetic")):
        print(f"[macrid] generating the synthetic dataset in {cfg.data.lake}/datasets/synthetic", flush=True)
        prepare(generate(SyntheticSpec()), cfg.data.lake, "synthetic", Protocol())


if __name__ == "__main__":
    sys.exit(main())
