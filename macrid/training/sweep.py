"""Hyper-parameter sweeps at cluster scale: Ray Tune over Ray Train runs.

    driver   Tuner(TPE behind a ConcurrencyLimiter, ASHA on validation NDCG@100), stored in the lake
    trial    one Ray Tune trial = one `launch` (a TorchTrainer with its own ScalingConfig: workers,
             CPUs and GPUs per worker, input mode), whose per-epoch reports reach Tune through
             TuneReportCallback; the trial's run folder is <lake>/runs/<sweep>-<trial id>/
    after    trials.parquet (config and last metrics per trial), best.toml (a config that
             `jobs/train.py --config` takes as it is), sweep.png (Fig. 4-style)

<lake>/runs/<sweep>/ray/ is Ray Tune's experiment folder; `resume` restores it (Tuner.restore): trials
that finished are kept, unfinished ones restart, and a restarted trial continues its run folder from
its last Ray Train checkpoint instead of refusing it. A trial lost with a node (its actor or its
workers) is restarted the same way, up to run.max_failures times (Tune's FailureConfig); the trials
that finished are never run again. Selection uses validation only. Tune's state files
are signed as they are written and checked before anything is unpickled (signed_state.py).

On the local Ray a sweep starts itself, `concurrent` trials share the machine: unless run.cpus_per_worker
is set, each trial's workers get 1/concurrent of its CPUs (`local_trial_cpus`). Sized as for a lone run,
every trial would ask for the whole machine and the limiter's trials would run one at a time, the others
timing out on worker start-up. On a cluster, workers keep the cluster default and the autoscaler adds nodes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time

import polars as pl

from macrid.cluster import connect
from macrid.config import Config, to_toml
from macrid.data import lake, layout
from macrid.data.batches import load_meta
from macrid.data.ray_data import DATA_RESERVE_CPUS, RAY_DATA_MODES
from macrid.errors import ConfigError
from macrid.training.launch import finish_stored, input_mode, launch, stored_progress
from macrid.training.run_folder import METRICS_FILE, MODEL_FILE, RAY_SNAPSHOT, run_uri
from macrid.training.search_space import apply
from macrid.training.signed_state import signing_filesystem, state_key, verify_experiment
# ray, hyperopt, matplotlib: imported inside the functions that use them. Importing them is a start-up cost
# (Ray about 1.2 s, matplotlib.pyplot about 1.7 s on the development VM) that the paths without them (--help,
# in-process runs, tests) need not pay.

METRIC = "val_ndcg@100"
INITIAL_POINTS = 5  # random trials before TPE models the results (hyperopt's default of 20 is most of a sweep)
TRIAL_CPUS = 0.01  # the trial's own actor only waits on its TorchTrainer, whose workers reserve the real CPUs
MIN_LOCAL_WORKER_CPUS = 0.25  # below this, a local trial's workers would crawl; fewer trials at once do better


def local_trial_cpus(node_cpus: float, concurrent: int, num_workers: int, streams: bool) -> float:
    """CPUs per worker so that `concurrent` trials of `num_workers` workers, their trial actors and, for
    streamed input, each trial's Ray Data reserve all fit on one node of `node_cpus` CPUs at once."""
    share = (node_cpus - concurrent * TRIAL_CPUS) / concurrent  # one trial's part of the machine
    cpus = (share - (DATA_RESERVE_CPUS if streams else 0.0)) / num_workers
    if cpus < MIN_LOCAL_WORKER_CPUS:
        raise ConfigError(
            f"{concurrent} concurrent trials of {num_workers} worker(s){' with streamed input' if streams else ''} "
            f"leave {max(cpus, 0):.2g} CPU per worker on this {node_cpus:g}-CPU machine; pass a smaller --concurrent"
            + (", or --set run.data='memory'" if streams else ""))
    return cpus


def size_local_trials(cfg: Config, concurrent: int) -> Config:
    """The base config with run.cpus_per_worker (and run.threads) for `concurrent` trials on this local Ray."""
    import ray

    if cfg.run.cpus_per_worker:
        return cfg
    streams = input_mode(cfg, load_meta(cfg.data.lake, cfg.data.dataset, cfg.data.version)) in RAY_DATA_MODES
    cpus = local_trial_cpus(float(ray.cluster_resources().get("CPU", 1)), concurrent, cfg.run.num_workers, streams)
    threads = cfg.run.threads or max(1, int(cpus))
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, cpus_per_worker=cpus, threads=threads))


def sweep_uri(cfg: Config, name: str) -> str:
    return layout.run_uri(cfg.data.lake, name)


def trial(params: dict) -> None:
    """One trial: the base config with the sampled values, trained by Ray Train, reported to Tune every epoch."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base = Config.from_dict(params.pop("base"), source="sweep base")
    sweep = params.pop("sweep")
    cfg = apply(base, {**params, "run.name": f"{sweep}-{tune.get_context().get_trial_id()}", "run.progress": False})
    # a trial restored by --resume continues its own run folder from Ray Train's last checkpoint
    resume = lake.exists(lake.join(run_uri(cfg), RAY_SNAPSHOT))
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=resume))
    launch(cfg, callbacks=[TuneReportCallback()])


def run_sweep(cfg: Config, space: dict, name: str, samples: int, concurrent: int = 2, grace_epochs: int = 1,
              resume: bool = False) -> dict:
    """Run (or, with resume, continue) a sweep; returns {"best_val_ndcg@100", "params", "best_config", ...}."""
    from hyperopt import hp
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.hyperopt import HyperOptSearch

    # checked before Ray starts and before anything is written, so a typo neither waits on Ray nor takes the name
    for flag, value in (("--samples", samples), ("--concurrent", concurrent), ("--grace-epochs", grace_epochs)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1")
    root = sweep_uri(cfg, name)
    fs, path = lake.resolve(lake.join(root, "ray"))
    exists = lake.exists(lake.join(root, "ray", "tuner.pkl"))
    if exists and not resume:
        raise ConfigError(f"{root} already holds a sweep; pass --resume to continue it or pick another --name")
    if resume and not exists:
        raise ConfigError(f"{root}: no sweep to resume (no ray/tuner.pkl); start it without --resume")
    key = state_key()
    if resume:  # before Ray starts: nothing of the lake's is unpickled unless this project's driver signed it
        verify_experiment(fs, path, key)
    signed = signing_filesystem(fs, path, key)
    trial_base = size_local_trials(cfg, concurrent) if connect() else cfg  # best.toml keeps cfg's own sizing
    trainable = tune.with_resources(trial, {"cpu": TRIAL_CPUS})
    if resume:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=signed)
    else:
        hp_space = {k: hp.choice(k, a) if kind == "choice" else getattr(hp, kind)(
            k, *([math.log(a[0]), math.log(a[1])] if kind == "loguniform" else a)) for k, (kind, a) in space.items()}
        search = HyperOptSearch(hp_space, metric=METRIC, mode="max", random_state_seed=cfg.run.seed,
                                n_initial_points=min(INITIAL_POINTS, samples))
        storage_path = path.rsplit("/", 1)[0]
        tuner = tune.Tuner(
            trainable,
            param_space={"base": trial_base.to_dict(), "sweep": name},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=samples,
                search_alg=ConcurrencyLimiter(search, max_concurrent=concurrent),
                # max_t one past the last epoch: ASHA never stops a trial at its final report, so the trial's
                # run finishes (model.pt, metrics.json) before Tune marks it done
                scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.optim.epochs + 1,
                                        grace_period=min(grace_epochs, cfg.optim.epochs))),
            # a trial whose actor died with its node restarts (up to run.max_failures times); its Ray Train run
            # then continues from its own last checkpoint (trial() sees the run folder's snapshot)
            run_config=tune.RunConfig(name="ray", storage_path=storage_path, storage_filesystem=signed,
                                      failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures)),
        )
    results = tuner.fit()
    unfinished = _finish_orphaned_trials(cfg, name, results)
    return _outputs(cfg, name, results, samples) | {"unfinished_trials": unfinished}


ORPHAN_POLL_S = 5.0
ORPHAN_MIN_STALL_S = 120.0  # an orphan's training counts as gone after max(this, 3 epochs) without a new epoch


def _finish_orphaned_trials(cfg: Config, name: str, results) -> list[str]:
    """Finish, or name, every trial whose run Tune saw end without its metrics.json and model.pt.

    A trial whose actor died with its node can end as done in Tune while its Ray Train controller is still
    training (the stored checkpoints go past the last epoch Tune heard of): wait while it advances, then finish
    its run from its checkpoints, as for one whose controller had already ended. A trial the scheduler stopped
    early (nothing stored past its last report) has nothing to finish. Any other is returned, and logged with
    what to do: never skipped in silence."""

    log = logging.getLogger(__name__)
    unfinished = []
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id")
        if r.error is not None or not trial_id:
            continue
        run = layout.run_uri(cfg.data.lake, f"{name}-{trial_id}")
        done = lambda: lake.exists(lake.join(run, METRICS_FILE)) and lake.exists(lake.join(run, MODEL_FILE))  # noqa: E731
        progress = stored_progress(run)
        if done() or progress is None:
            continue
        reported = int((r.metrics or {}).get("epoch", 0))
        if not progress.ended and progress.epoch > reported:
            log.warning("trial %s: Tune stopped hearing from it at epoch %d, but its Ray Train run is at epoch %d; "
                        "waiting for that training to end", trial_id, reported, progress.epoch)
            progress = _wait_for_stored_training(run, progress, done)
        if done():
            continue
        if progress.ended:
            if finish_stored(run) is not None:
                log.warning("trial %s's training ended but its actor was lost before it finished the run; "
                            "finished %s from its checkpoints", trial_id, run)
            continue
        if progress.epoch > reported:  # it trained past what Tune saw, then stopped: lost, not stopped early
            unfinished.append(run)
            log.warning("trial %s: its training was lost at epoch %d of %d and its run has no model.pt; finish it "
                        "with: python jobs/train.py --config <its run.json's config> --set run.name='%s-%s' "
                        "--resume", trial_id, progress.epoch, cfg.optim.epochs, name, trial_id)
    return unfinished


def _wait_for_stored_training(run: str, progress, done):
    """Poll the run's stored progress until its training ends, its run is finished, or no new epoch comes for
    max(ORPHAN_MIN_STALL_S, 3 epochs)."""
    stall_s = max(ORPHAN_MIN_STALL_S, 3 * progress.seconds_per_epoch)
    last_change = time.monotonic()
    while not progress.ended and not done() and time.monotonic() - last_change < stall_s:
        time.sleep(ORPHAN_POLL_S)
        now = stored_progress(run) or progress
        if now.epoch != progress.epoch or now.ended != progress.ended:
            last_change = time.monotonic()
        progress = now
    return progress


def _outputs(cfg: Config, name: str, results, samples: int) -> dict:
    """trials.parquet, best.toml and sweep.png in the sweep's folder."""
    root = sweep_uri(cfg, name)
    frame = results.get_dataframe()
    keep = [c for c in frame.columns if c.startswith("config/") and c not in ("config/base", "config/sweep")]
    keep += [c for c in ("trial_id", "epoch", METRIC, "val_independence", "training_iteration") if c in frame.columns]
    table = pl.from_pandas(frame[keep]).rename({c: c.removeprefix("config/") for c in keep})
    table = table.with_columns(best_val_ndcg=pl.Series([float(r.metrics_dataframe[METRIC].max())
                                                        if r.metrics_dataframe is not None and METRIC in
                                                        r.metrics_dataframe else float("nan") for r in results]))
    with tempfile.TemporaryDirectory() as tmp:
        table.write_parquet(f"{tmp}/trials.parquet")
        lake.write_bytes(lake.join(root, "trials.parquet"), open(f"{tmp}/trials.parquet", "rb").read())
        _figure(results, f"{tmp}/sweep.png", name, cfg.optim.epochs)
        lake.write_bytes(lake.join(root, "sweep.png"), open(f"{tmp}/sweep.png", "rb").read())
    best = results.get_best_result(metric=METRIC, mode="max", scope="all")
    chosen = {k: v for k, v in best.config.items() if k not in ("base", "sweep")}
    score = float(best.metrics_dataframe[METRIC].max())
    best_cfg = apply(cfg, chosen)
    best_cfg = dataclasses.replace(best_cfg, run=dataclasses.replace(best_cfg.run, name="", resume=False))
    text = to_toml(best_cfg, f"best of sweep {name}: validation NDCG@100 {score:.4f} ({len(table)} of {samples} "
                             f"trials)\ntrain with: python jobs/train.py --config <this file>")
    lake.write_bytes(lake.join(root, "best.toml"), text.encode())
    return {METRIC: score, "params": chosen, "trials": len(table), "best_config": lake.join(root, "best.toml"),
            "table": lake.join(root, "trials.parquet"), "figure": lake.join(root, "sweep.png")}


def _figure(results, path: str, name: str, epochs: int) -> None:
    """Fig. 4 of the paper for one sweep: independence against NDCG@100 per trial; NDCG against beta and sigma0.
    Trials that ASHA stopped before `epochs` are drawn hollow: their score is that of a shorter run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []  # (best val NDCG, its independence, beta, sigma0, ran every epoch)
    for r in results:
        df = r.metrics_dataframe
        if df is None or METRIC not in df:
            continue
        best = df.loc[df[METRIC].idxmax()]
        rows.append((best[METRIC], best.get("val_independence", float("nan")), r.config.get("optim.beta"),
                     r.config.get("model.sigma0"), "epoch" in df and df["epoch"].max() >= epochs))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [(1, "independence (validation users)"), (2, "β (optim.beta)"), (3, "σ0 (model.sigma0)")]
    for ax, (col, label) in zip(axes, panels, strict=True):
        pts = [(r[col], r[0], r[4]) for r in rows if r[col] is not None and not (isinstance(r[col], float) and
                                                                                  math.isnan(r[col]))]
        for full, style in ((True, dict(color="C0", label=f"ran all {epochs} epochs")),
                            (False, dict(facecolors="none", edgecolors="C0", label="stopped early by ASHA"))):
            mine = [p for p in pts if p[2] == full]
            if mine:
                ax.scatter([p[0] for p in mine], [p[1] for p in mine], s=24, alpha=0.8, **style)
        if not pts:
            ax.text(0.5, 0.5, "not searched", ha="center", va="center", transform=ax.transAxes)
        elif col == 1:
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel(label)
        ax.set_ylabel("validation NDCG@100")
    fig.suptitle(f"sweep {name}: {len(rows)} trials (best validation epoch of each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
