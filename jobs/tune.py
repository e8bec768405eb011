"""Hyper-parameter sweep with Ray Tune: TPE (hyperopt, as the paper) + ASHA early stopping.

Each trial runs the training loop in its own process (one Ray task) and reports
validation NDCG@100 every epoch; test numbers are never looked at for selection.
  python jobs/tune.py --config configs/ml-1m.toml --samples 24 --cpus-per-trial 1
  python jobs/tune.py --config configs/ml-1m.toml --set model.name=multvae --samples 16
The search space is a TOML file (--space, default configs/search/<model>.toml); a key the config
does not have is refused before any trial starts. The best trial's whole config is written to
<lake>/runs/<sweep>/best.toml, which `jobs/train.py --config` takes as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

from macrid import lake
from macrid.config import Config, load_config, to_toml
from macrid.errors import MacridError
from macrid.search_space import apply, load_space

INITIAL_POINTS = 5  # random trials before TPE models the results (hyperopt's default of 20 is most of a sweep)


def trainable(params: dict) -> None:
    from ray import tune

    from macrid.train import run_in_process

    base = Config.from_dict(params.pop("base"), source="sweep base")
    trial = tune.get_context().get_trial_id()
    cfg = apply(base, {**params, "run.name": f"{base.run.name}/{trial}", "run.progress": False})
    run_in_process(cfg, on_report=lambda row: tune.report({k: v for k, v in row.items()
                                                           if isinstance(v, (int, float))}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--samples", type=int, default=24, help="trials to run")
    p.add_argument("--cpus-per-trial", type=int, default=1)
    p.add_argument("--grace-epochs", type=int, default=15, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--name", default=None, help="sweep name (default tune-<dataset>-<model>)")
    p.add_argument("--space", default=None, help="search space TOML (default configs/search/<model>.toml)")
    p.add_argument("--concurrent", type=int, default=2, help="trials running at once (TPE learns between them)")
    args = p.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        cfg = load_config(args.config, args.set)
        space_file = args.space or os.path.join(here, "configs", "search", f"{cfg.model.name}.toml")
        searched = load_space(space_file, cfg)  # a key the config lacks stops here, before any trial
    except MacridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from hyperopt import hp
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.hyperopt import HyperOptSearch

    from macrid.launch import connect

    name = args.name or f"tune-{cfg.data.dataset}-{cfg.model.name}"
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name, threads=args.cpus_per_trial))
    space = {}
    for key, (kind, a) in searched.items():
        space[key] = hp.choice(key, a) if kind == "choice" else getattr(hp, kind)(
            key, *([math.log(a[0]), math.log(a[1])] if kind == "loguniform" else a))
    connect()  # joins a cluster (ray job submit) or starts a local Ray
    fs, runs_path = lake.resolve(lake.join(cfg.data.lake, "runs", name))
    search = HyperOptSearch(space, metric="val_ndcg@100", mode="max", random_state_seed=cfg.run.seed,
                            n_initial_points=INITIAL_POINTS)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": args.cpus_per_trial}),
        param_space={"base": cfg.to_dict()},
        tune_config=tune.TuneConfig(
            metric="val_ndcg@100", mode="max", num_samples=args.samples,
            search_alg=ConcurrencyLimiter(search, max_concurrent=args.concurrent),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.optim.epochs, grace_period=args.grace_epochs),
        ),
        run_config=tune.RunConfig(name="ray", storage_path=runs_path, storage_filesystem=fs),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="val_ndcg@100", mode="max", scope="all")
    chosen = {k: v for k, v in best.config.items() if k != "base"}
    score = float(best.metrics_dataframe["val_ndcg@100"].max())
    best_cfg = apply(cfg, chosen)
    best_cfg = dataclasses.replace(best_cfg, run=dataclasses.replace(best_cfg.run, name="", threads=0))
    text = to_toml(best_cfg, f"best of sweep {name}: validation NDCG@100 {score:.4f} ({args.samples} trials)\n"
                             f"train with: python jobs/train.py --config <this file>")
    out = lake.join(cfg.data.lake, "runs", name, "best.toml")
    lake.write_bytes(out, text.encode())
    print(json.dumps({"best_val_ndcg@100": score, "params": chosen, "best_config": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
