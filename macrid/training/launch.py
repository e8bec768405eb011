"""The driver: join or start Ray, build the TorchTrainer, run the workers, finish the run.

Runs the same under `python jobs/train.py` (joins a running cluster if there is one, else starts
a local Ray) and under `ray job submit -- python jobs/train.py` (joins the cluster the job runs on).

Ray Train owns the run's lifecycle: the run folder <lake>/runs/<run>/ is Ray's storage
(`RunConfig(storage_path=<lake>/runs, name=<run>)`), workers report every epoch with a checkpoint,
Ray keeps the latest and the best by validation NDCG@100, restarts failed workers from the latest,
and a run started again under the same name (--resume) continues from it. After `fit` the driver
scores the best checkpoint on validation and test and writes metrics.json (train.finish).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time

import torch

from macrid.cluster import connect
from macrid.config import Config
from macrid.data import lake, layout
from macrid.data.batches import snapshot_uri
from macrid.data.ray_data import DATA_RESERVE_CPUS, RAY_DATA_MODES, CachedShard, stream_batches, train_dataset
from macrid.errors import ConfigError, DataError, MacridError
from macrid.training import checkpoint
from macrid.training.run_folder import RAY_SNAPSHOT, has_run, pin_run, run_uri
from macrid.training.session import SCORE, STATE_FILE, RaySession
from macrid.training.train import finish, fit
from macrid.training.warm_start import prepare_warm_start
# ray: imported inside the functions that use them. Importing them is a start-up cost (Ray about 1.2 s on the
# development VM) that the paths without them (--help, in-process runs, tests) need not pay.

DEFAULT_CLUSTER_CPUS_PER_WORKER = 1.0
CACHED_BYTES_PER_INTERACTION = 11  # peak RSS of a cached share over a streamed one, measured (throughput.md)


def _record_worker(cfg: Config, rank: int, world: int) -> None:
    """<run>/_workers/rank-<r>.json: where this rank runs (Ray node, host, pid), rewritten on every (re)start,
    so a run on several nodes says which node held which rank."""
    import ray

    lake.write_json(lake.join(run_uri(cfg), "_workers", f"rank-{rank}.json"),
                    {"rank": rank, "world": world, "node_id": ray.get_runtime_context().get_node_id(),
                     "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: rebuild the typed config once, then train on this worker's shard."""
    import ray.train

    cfg = Config.from_dict(config, source="train_loop_config")
    session = RaySession()
    _record_worker(cfg, session.rank, session.world)
    per_worker, seed, rank = cfg.optim.batch_size // session.world, cfg.run.seed, session.rank
    source = None  # "memory": fit reads this rank's share itself
    if cfg.run.data == "stream":
        shard = ray.train.get_dataset_shard("train")
        train_uri = lake.join(snapshot_uri(cfg.data.lake, cfg.data.dataset, cfg.data.version), "train")
        source = lambda epoch: stream_batches(shard, per_worker, seed, epoch, rank, train_uri=train_uri)  # noqa: E731
    elif cfg.run.data == "cache":
        source = CachedShard(ray.train.get_dataset_shard("train"), per_worker, seed, rank)
    try:
        fit(cfg, session, train_batches=source)
    except DataError as e:
        if lake.is_s3(cfg.data.lake):
            raise
        raise DataError(f"{e}\n(on node {os.uname().nodename}: a local lake must be visible at the same path "
                        "on every node; on a multi-node cluster put the lake on s3://)") from None


def prepare_lake(cfg: Config) -> Config:
    """Make a local lake absolute (workers may run elsewhere; refused when relative under `ray job submit`)
    and check that the lake can be reached."""
    data = cfg.data
    if not lake.is_s3(data.lake):
        if not os.path.isabs(data.lake) and _submitted_job():
            raise ConfigError(
                f"--lake {data.lake} is relative, and under `ray job submit` it would resolve inside the uploaded "
                f"working directory ({os.getcwd()}), not where you ran the command. Pass an absolute path "
                "(a local head: --lake \"$PWD/lake\") or s3://bucket/prefix (any cluster)")
        data = dataclasses.replace(data, lake=os.path.abspath(data.lake))
    cfg = dataclasses.replace(cfg, data=data)
    lake.check_root(cfg.data.lake)
    return cfg


def prepare_config(cfg: Config) -> Config:
    """Name the run, make a local lake absolute (workers may run elsewhere), refuse to clobber a run."""
    run = cfg.run
    if not run.name:
        run = dataclasses.replace(run, name=f"{cfg.data.dataset}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = prepare_lake(dataclasses.replace(cfg, run=run))
    has_run(cfg)  # refuses to clobber an existing run unless --resume
    if cfg.optim.batch_size < cfg.run.num_workers:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is smaller than run.num_workers")
    # Restarted workers must resume, not refuse: from here on the run folder is ours.
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True))


def worker_resources(cfg: Config, local: bool) -> Config:
    """Fill in run.cpus_per_worker and run.threads; refuse sizes that would deadlock a local Ray."""
    import ray

    W, run = cfg.run.num_workers, cfg.run
    local_cpus = float(ray.cluster_resources().get("CPU", 1)) if local else 0.0
    streams = run.data in RAY_DATA_MODES
    reserve = DATA_RESERVE_CPUS if streams else 0.0  # Ray Data's tasks need CPU beside the trainers
    cpus = run.cpus_per_worker or (max(0.5, (local_cpus - reserve) / W) if local else DEFAULT_CLUSTER_CPUS_PER_WORKER)
    # Ray Data splits the CPUs the trainers leave among its operators; with less than one whole CPU left,
    # no operator's share reaches a read task's 0.25 and the run waits forever (measured on 2 cores).
    if local and streams and local_cpus - W * cpus < DATA_RESERVE_CPUS:
        raise ConfigError(
            f"{W} workers x {cpus:g} CPUs leave less than {DATA_RESERVE_CPUS:g} CPU for Ray Data on this "
            f"{local_cpus:g}-CPU machine, and the run would wait forever; pass --cpus-per-worker "
            f"{max(0.25, (local_cpus - DATA_RESERVE_CPUS) / W):g} or --set run.data='memory'")
    threads = run.threads or max(1, int(cpus))  # Ray sets OMP_NUM_THREADS to whole CPUs only
    return dataclasses.replace(cfg, run=dataclasses.replace(run, cpus_per_worker=cpus, threads=threads))


def launch(cfg: Config, callbacks: list | None = None) -> dict:
    """Train cfg under Ray Train and finish the run; callbacks go to Ray Train's RunConfig (a sweep's
    TuneReportCallback)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = prepare_config(cfg)
    cfg, meta = pin_run(cfg, "ray")  # fail here, with the cause, before starting workers
    prepare_warm_start(cfg, meta)  # the parent's rows by item ID, once, in <run>/warm_start.pt
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, data=input_mode(cfg, meta)))
    local = connect()
    if not lake.is_s3(cfg.data.lake) and sum(n["Alive"] for n in ray.nodes()) > 1:
        raise ConfigError(f"--lake {cfg.data.lake} is a local path, but this Ray cluster has several nodes that "
                          "cannot all see it; put the lake on s3://bucket/prefix")
    cfg = worker_resources(cfg, local)
    W, run = cfg.run.num_workers, cfg.run
    resources = {"CPU": run.cpus_per_worker} | ({"GPU": run.gpus_per_worker} if run.use_gpu else {})
    datasets = {}
    if run.data in RAY_DATA_MODES:
        datasets["train"] = train_dataset(cfg.data.lake, cfg.data.dataset, cfg.data.version)
    fs, runs_path = lake.resolve(layout.runs_uri(cfg.data.lake))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=(run.min_workers, W) if run.min_workers else W,
                                     elastic_resize_monitor_interval_s=run.resize_check_s, use_gpu=run.use_gpu,
                                     resources_per_worker=resources, placement_strategy=run.placement),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"] if datasets else []),
        run_config=RunConfig(
            name=run.name, storage_path=runs_path, storage_filesystem=fs, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=run.max_failures),
            # Ray Train logs every report and checkpoint at INFO; the progress bar says the same once per epoch
            logging_config=ray.LoggingConfig(log_level="WARNING"),
            # the latest checkpoint is always kept besides these: resume needs it, selection the best
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE,
                                               checkpoint_score_order="max")),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _user_error(e) or e from None
    if result.checkpoint is None:
        raise RuntimeError(f"{run_uri(cfg)}: Ray Train finished without a checkpoint; see the log above")
    best = checkpoint.from_ray(result.get_best_checkpoint(SCORE, "max") or result.checkpoint,
                               meta["vocabulary_fingerprint"])
    with result.checkpoint.filesystem.open_input_stream(f"{result.checkpoint.path}/{STATE_FILE}") as f:
        history = json.loads(f.read())["history"]
    return finish_on_the_training_device(cfg, best, history)


def finish_on_the_training_device(cfg: Config, best: dict, history: list[dict]) -> dict:
    """Score validation and test where the run trained. A CPU run: on the driver's CPU. A GPU run: on the
    driver's GPU when it has one (a GPU head, a single-node job), else in a Ray task holding one GPU (a CPU-only
    head: the workers' GPUs are free again once fit has returned)."""
    import ray

    if not cfg.run.use_gpu:
        return finish(cfg, best, history, "cpu")
    if torch.cuda.is_available():
        return finish(cfg, best, history, "cuda")
    logging.getLogger(__name__).info("this driver has no GPU: scoring validation and test in a one-GPU Ray task")
    return ray.get(ray.remote(num_gpus=1)(_finish_in_a_gpu_task).remote(cfg, best, history))


def _finish_in_a_gpu_task(cfg: Config, best: dict, history: list[dict]) -> dict:
    import ray

    # Ray points CUDA_VISIBLE_DEVICES at this task's GPU; a logical GPU without CUDA (a test's) scores on the CPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return finish(cfg, best, history, device, ray_task_gpus=ray.get_gpu_ids())


@dataclasses.dataclass(frozen=True)
class StoredProgress:
    """How far a run's training got, by what Ray Train stored in its folder."""
    epoch: int  # the newest registered checkpoint's epoch
    ended: bool  # its training ended there (the last epoch, or patience)
    seconds_per_epoch: float  # the mean of the stored history's epochs (0 when unknown)


def stored_progress(run: str) -> StoredProgress | None:
    """Read back, with ray.train.Result.from_path, how far the run's training got; None without a checkpoint."""
    import ray.train

    if not lake.exists(lake.join(run, RAY_SNAPSHOT)):
        return None
    fs, path = lake.resolve(run)
    latest = ray.train.Result.from_path(path, storage_filesystem=fs).checkpoint
    if latest is None:
        return None
    with latest.filesystem.open_input_stream(f"{latest.path}/{STATE_FILE}") as f:
        stored = json.loads(f.read())
    history = stored.get("history") or []
    seconds = [float(h["seconds"]) for h in history if isinstance(h.get("seconds"), (int, float))]
    return StoredProgress(epoch=int(history[-1]["epoch"]) if history else 0, ended=bool(stored.get("ended")),
                          seconds_per_epoch=sum(seconds) / len(seconds) if seconds else 0.0)


def finish_stored(run: str) -> dict | None:
    """Finish a run from what Ray Train stored in its folder (read back with ray.train.Result.from_path: its best
    and latest checkpoints), when its driver was lost after training: a sweep trial's actor that went with its
    node while its Ray Train controller went on. Returns metrics.json, or None when the folder holds no checkpoint
    or its training did not end (a trial its scheduler stopped early)."""
    import ray.train

    progress = stored_progress(run)
    if progress is None or not progress.ended:  # none, or stopped midway (a sweep's scheduler stopped it)
        return None
    fs, path = lake.resolve(run)
    result = ray.train.Result.from_path(path, storage_filesystem=fs)
    best = result.get_best_checkpoint(SCORE, "max") or result.checkpoint
    saved = checkpoint.from_ray(best)
    with result.checkpoint.filesystem.open_input_stream(f"{result.checkpoint.path}/{STATE_FILE}") as f:
        history = json.loads(f.read())["history"]
    return finish_on_the_training_device(Config.from_dict(saved["config"], source=best.path), saved, history)


def input_mode(cfg: Config, meta: dict) -> str:
    """run.data -> "memory", "cache" or "stream". "auto": memory while a worker's share of the training bags
    (CACHED_BYTES_PER_INTERACTION, 1/W of them) fits run.memory_budget_gb; past that, stream. Once read,
    memory and cache input cost nothing per epoch, and on the planted 5 x 10^7-interaction lake streaming
    delivered 50x the users/s the training step consumes, so the choice is one of memory
    (benchmarks/throughput.md)."""
    if cfg.run.data == "ray":
        return "stream"
    if cfg.run.data != "auto":
        return cfg.run.data
    fewest = cfg.run.min_workers or cfg.run.num_workers  # elastic: a worker's share when the group is smallest
    share_gb = CACHED_BYTES_PER_INTERACTION * meta["train"]["interactions"] / fewest / 1e9
    return "memory" if share_gb <= cfg.run.memory_budget_gb else "stream"


def _user_error(failure: Exception) -> MacridError | None:
    """A worker's MacridError (a bad shard, a gone version, ...) out of Ray's wrapper, so that the job ends with
    its message instead of a traceback per worker."""
    for error in getattr(failure, "worker_failures", {}).values():
        found, cause = None, error
        while cause is not None:  # the deepest one: Ray's wrappers subclass it but carry tracebacks in str()
            if isinstance(cause, MacridError):
                found = cause
            cause = getattr(cause, "cause", None) or cause.__cause__
        if found is not None:
            return found
    return None


def _submitted_job() -> bool:
    """Whether this driver runs as a `ray job submit` entrypoint (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
