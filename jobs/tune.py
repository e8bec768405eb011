"""Hyper-parameter sweep with Ray Tune: TPE (hyperopt, as the paper) + ASHA early stopping.

Each trial runs the training loop in its own process (one Ray task) and reports
validation NDCG@100 every epoch; test numbers are never looked at for selection.
  python jobs/tune.py --config configs/ml-1m.toml --samples 24 --cpus-per-trial 1
  python jobs/tune.py --config configs/ml-1m.toml --set model.name=multvae --samples 16
The best trial's config is printed as TOML; paste it into configs/<dataset>.toml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from macrid.config import Config, load_config
from macrid.errors import MacridError

# (kind, args): hyperopt distributions over dotted config keys. The keys every model shares:
_COMMON = {
    "model.dropout": ("uniform", 0.2, 0.7),
    "optim.lr": ("loguniform", 3e-4, 3e-3),
    "optim.weight_decay": ("choice", [0.0, 1e-7, 1e-6, 1e-5]),
    "optim.ema": ("choice", [0.0, 0.9, 0.97]),
}
SPACES = {
    "macridvae": _COMMON | {
        "optim.beta": ("loguniform", 0.02, 1.0),
        "model.sigma0": ("loguniform", 0.05, 0.5),
        "model.K": ("choice", [3, 5, 7, 9, 12]),
        "model.gumbel": ("choice", [True, False]),
        "optim.batch_size": ("choice", [100, 250, 500]),
        "optim.anneal_epochs": ("choice", [1.0, 5.0, 20.0]),
    },
    "multvae": _COMMON | {
        "optim.beta": ("loguniform", 0.01, 1.0),
        "optim.batch_size": ("choice", [100, 250, 500]),
        "optim.anneal_epochs": ("choice", [1.0, 5.0, 20.0]),
    },
    "multdae": _COMMON | {"optim.batch_size": ("choice", [100, 200, 500])},
}


def with_overrides(cfg: Config, flat: dict) -> Config:
    raw = cfg.to_dict()
    for key, value in flat.items():
        section, name = key.split(".")
        raw[section][name] = value
    return Config.from_dict(raw, source="sweep")


def trainable(params: dict) -> None:
    from ray import tune

    from macrid.train import run_in_process

    base = Config.from_dict(params.pop("base"), source="sweep base")
    trial = tune.get_context().get_trial_id()
    cfg = with_overrides(base, {**params, "run.name": f"{base.run.name}/{trial}", "run.progress": False})
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
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except MacridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray
    from hyperopt import hp
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.hyperopt import HyperOptSearch

    name = args.name or f"tune-{cfg.data.dataset}-{cfg.model.name}"
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name, threads=args.cpus_per_trial))
    space = {}
    for key, (kind, *a) in SPACES[cfg.model.name].items():
        space[key] = hp.choice(key, a[0]) if kind == "choice" else getattr(hp, kind)(
            key, *([__import__("math").log(a[0]), __import__("math").log(a[1])] if kind == "loguniform" else a))
    ray.init(include_dashboard=False, object_store_memory=256 * 1024**2, configure_logging=False)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": args.cpus_per_trial}),
        param_space={"base": cfg.to_dict()},
        tune_config=tune.TuneConfig(
            metric="val_ndcg@100", mode="max", num_samples=args.samples,
            search_alg=HyperOptSearch(space, metric="val_ndcg@100", mode="max", random_state_seed=cfg.run.seed),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.optim.epochs, grace_period=args.grace_epochs),
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(__import__("pathlib").Path(cfg.data.lake).resolve()
                                                               / "runs" / name / "ray")),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="val_ndcg@100", mode="max", scope="all")
    chosen = {k: v for k, v in best.config.items() if k != "base"}
    print(json.dumps({"best_val_ndcg@100": best.metrics_dataframe["val_ndcg@100"].max(), "params": chosen}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
