r"""Hyper-parameter sweep at cluster scale: Ray Tune over Ray Train runs, TPE (hyperopt, as the paper)
behind a concurrency limit, ASHA early stopping on validation NDCG@100.

  python jobs/tune.py --config configs/ml-1m.toml --samples 24
  python jobs/tune.py --config configs/ml-1m.toml --samples 48 --concurrent 8 --set run.num_workers=2 \
      --set run.use_gpu=true --lake s3://bucket/macrid --name ml-1m-gpu
  python jobs/tune.py --config configs/ml-1m.toml --name ml-1m-gpu --resume       # after an interruption
  python jobs/tune.py --config configs/ml-1m.toml --samples 8 --warm-start prod      # every trial from alias prod
  ray job submit --working-dir . -- python jobs/tune.py --config configs/ml-1m.toml --lake s3://bucket/macrid

Each trial is a Ray Train run with the config's scaling and input (run.num_workers, run.cpus_per_worker,
run.use_gpu, run.data), reporting every epoch. The search space is a TOML file (--space, default
configs/search/<model>.toml); a key the config does not have is refused before any trial starts.
Outputs in <lake>/runs/<name>/: best.toml (`jobs/train.py --config` takes it as it is), trials.parquet,
sweep.png (independence and validation NDCG@100 per trial, NDCG against beta and sigma0), and ray/ (Ray
Tune's experiment, what --resume restores: finished trials are not run again). Test numbers are never
used for selection.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from macrid.config import load_config
from macrid.names import check_name
from macrid.errors import MacridError, user_error
from macrid.training.search_space import load_space


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the base config (TOML); every trial starts from it")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override the base")
    p.add_argument("--lake", help="shortcut for --set data.lake=... (results go to <lake>/runs/<name>/)")
    p.add_argument("--space", default=None, help="search space TOML (default configs/search/<model>.toml)")
    p.add_argument("--samples", type=int, default=24, help="trials to run (default 24)")
    p.add_argument("--concurrent", type=int, default=2,
                   help="trials at once; TPE learns between them. On the local Ray a sweep starts, each trial's workers "
                        "get 1/N of the machine's CPUs unless run.cpus_per_worker is set (default 2)")
    p.add_argument("--grace-epochs", type=int, default=15, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--name", default=None, help="sweep name (default tune-<dataset>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this --name")
    p.add_argument("--warm-start", metavar="RUN_OR_MODEL",
                   help="every trial starts from this finished run, or the run this model alias points to (resolved "
                        "once, when the sweep starts); the search space must leave the model's shape alone "
                        "(docs/nightly.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        overrides = list(args.set) + ([f"data.lake={args.lake!r}"] if args.lake else [])
        cfg = load_config(args.config, overrides)
        if args.warm_start:
            from macrid.training.registry import with_parent

            cfg = with_parent(cfg, args.warm_start)
        space = load_space(args.space or os.path.join(here, "configs", "search", f"{cfg.model.name}.toml"), cfg)
        from macrid.training.launch import prepare_lake
        from macrid.training.sweep import run_sweep

        cfg = prepare_lake(cfg)
        name = f"tune-{cfg.data.dataset}-{cfg.model.name}" if args.name is None else check_name("sweep", args.name)
        summary = run_sweep(cfg, space, name, args.samples, args.concurrent, args.grace_epochs, args.resume)
    except (MacridError, OSError) as e:
        if user_error(e) is None:  # a fault of the program, not of the input
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
