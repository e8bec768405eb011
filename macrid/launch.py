"""The driver: start or join Ray, build the TorchTrainer, run the worker function, return metrics.json.

Runs the same under `python jobs/train.py` (local Ray started here) and under
`ray job submit -- python jobs/train.py` (joins the cluster the job runs on).
"""

from __future__ import annotations

import dataclasses
import os
import time

from macrid import lake
from macrid.config import Config
from macrid.errors import ConfigError
from macrid.train import fit, has_checkpoint, run_uri

MEMORY_INPUT_MAX_INTERACTIONS = 20_000_000  # ~160 MB of int64 item ids per worker


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: rebuild the typed config once, then train on this worker's shard."""
    import ray.train
    import ray.train.torch

    from macrid.ray_data import shard_batches

    cfg = Config.from_dict(config, source="train_loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    source = None
    if cfg.run.data == "ray":
        shard = ray.train.get_dataset_shard("train")
        source = lambda epoch: shard_batches(shard)  # noqa: E731 - the shard reshuffles on every pass
    wrap = ray.train.torch.prepare_model if world > 1 else (lambda m: m)
    metrics = fit(cfg, report=None, rank=rank, world=world, wrap_model=wrap, train_batches=source)
    # Result.metrics is None unless a report is made; one final report carries the headline numbers.
    ray.train.report({"val_ndcg@100": metrics["val"]["ndcg@100"][0], "test_ndcg@100": metrics["test"]["ndcg@100"][0],
                      "epochs_run": metrics["epochs_run"]} if rank == 0 else {})


def prepare_config(cfg: Config) -> Config:
    """Name the run, make a local lake absolute (workers may run elsewhere), refuse to clobber a run."""
    run = cfg.run
    if not run.name:
        run = dataclasses.replace(run, name=f"{cfg.data.dataset}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    data = cfg.data
    if not lake.is_s3(data.lake):
        data = dataclasses.replace(data, lake=os.path.abspath(data.lake))
    cfg = dataclasses.replace(cfg, run=run, data=data)
    lake.check_root(cfg.data.lake)
    has_checkpoint(cfg)  # refuses to clobber an existing run unless --resume
    if cfg.optim.batch_size < cfg.run.num_workers:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is smaller than run.num_workers")
    # Restarted workers must resume, not refuse: from here on the run folder is ours.
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True))


def launch(cfg: Config) -> dict:
    import ray
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from macrid.batches import load_meta
    from macrid.ray_data import train_dataset

    cfg = prepare_config(cfg)
    meta = load_meta(cfg.data.lake, cfg.data.dataset)  # fail here, with the cause, before starting workers
    if cfg.run.data == "auto":
        # Ray Data re-runs its pipeline every epoch: seconds of fixed cost that only pay off when the
        # training set is too big to hold on each worker (benchmarks/throughput.md).
        small = meta["train"]["interactions"] <= MEMORY_INPUT_MAX_INTERACTIONS
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, data="memory" if small else "ray"))
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`, or pointed at a cluster: join it as it is
            ray.init()
        else:  # a laptop: a local Ray sized for it
            ray.init(include_dashboard=False, object_store_memory=256 * 1024**2, configure_logging=False)
    W = cfg.run.num_workers
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    # Leave one whole CPU for Ray Data: its file-listing task asks for 1 CPU, and a trainer holding
    # the rest of a small machine would leave it waiting forever (the deadlock in ENVIRONMENT.md).
    reserve = 1.0 if cfg.run.data == "ray" else 0.0
    per_worker = max(0.25, (total_cpus - reserve) / W)
    if cfg.run.use_gpu:
        per_worker = 1
    if not cfg.run.threads:  # Ray sets OMP_NUM_THREADS to whole CPUs only; use the worker's real share
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, threads=max(1, round(total_cpus / W))))
    datasets = {}
    if cfg.run.data == "ray":
        datasets["train"] = train_dataset(cfg.data.lake, cfg.data.dataset, max(1, cfg.optim.batch_size // W))
    fs, path = lake.resolve(lake.join(run_uri(cfg), "ray"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=W, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker={"CPU": per_worker}),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"] if datasets else []),
        run_config=RunConfig(name="ray", storage_path=path.rsplit("/", 1)[0], storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures)),
    )
    trainer.fit()
    return lake.read_json(lake.join(run_uri(cfg), "metrics.json"))
