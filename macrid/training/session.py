"""Where a training run's workers report each epoch and restore from: Ray Train, or a local run folder.

`fit` (macrid/training/train.py) is the same loop in both cases; a session gives it its rank, world size and
device, wraps the model for data parallelism, hands it the checkpoint to resume from, and takes one
report per epoch (metrics from every rank, the checkpoint from rank 0).

- `RaySession` (Ray Train workers): `ray.train.report(metrics, checkpoint)` every epoch; rank 0 waits until
  Ray Train has registered its checkpoint before the next epoch (a restart then redoes at most the epoch in
  progress), the other ranks do not wait on its upload; Ray's storage (the run folder)
  keeps the latest checkpoint and the best by validation NDCG@100; `ray.train.get_checkpoint()`
  resumes after a worker failure or a restart of the run with --resume.
- `LocalSession` (in-process runs, sweeps' trials, tests): the same checkpoint file as
  <run>/checkpoints/latest.pt and best.pt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable

import torch

from macrid.data import lake
from macrid.errors import ConfigError
from macrid.training import checkpoint
# ray: imported inside the functions that use them. Importing them is a start-up cost (Ray about 1.2 s on the
# development VM) that the paths without them (--help, in-process runs, tests) need not pay.

SCORE = "selection_score"  # validation NDCG@100 on evaluated epochs, -1 (below any NDCG) on the others
STATE_FILE = "train_state.json"  # epoch, step and history beside the checkpoint, readable without the weights


def resolve_device(name: str) -> torch.device:
    """run.device -> a torch device; 'auto' is CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} but torch sees no CUDA device (torch {torch.__version__}); "
                          "use run.device='cpu' or install a CUDA build of torch")
    return device


class LocalSession:
    """Rank 0 of 1 in this process; checkpoints in <run>/checkpoints/{latest,best}.pt."""

    rank, world = 0, 1

    def __init__(self, run_uri: str, device: str = "auto", on_report: Callable[[dict], None] | None = None):
        self.dir = lake.join(run_uri, "checkpoints")
        self.device = resolve_device(device)
        self.on_report = on_report
        self.best_score = -math.inf

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def restore(self, fingerprint: str) -> dict | None:
        path = f"{self.dir}/latest.pt"
        if not lake.exists(path):
            return None
        state = checkpoint.load(path, fingerprint)
        self.best_score = state["extra"]["best"]
        return state

    def settle(self, row: dict) -> None:
        """Checkpoints are written synchronously here: nothing to wait for."""
    def report(self, row: dict, ckpt: bytes | None, history: list[dict], ended: bool = False) -> None:
        lake.write_bytes(f"{self.dir}/latest.pt", ckpt)
        if row[SCORE] > self.best_score:
            self.best_score = row[SCORE]
            lake.write_bytes(f"{self.dir}/best.pt", ckpt)
        if self.on_report is not None:
            self.on_report(row)

    def best_checkpoint(self, fingerprint: str) -> dict:
        return checkpoint.load(f"{self.dir}/best.pt", fingerprint)


class RaySession:
    """A Ray Train worker: rank, world and device from Ray; reports and checkpoints go to Ray."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self._waited = 0.0  # seconds the last report waited for its checkpoint to be registered
        self._registered_epoch = 0  # the newest epoch Ray Train had registered after that wait
        self.device = ray.train.torch.get_device()
        _quiet_report_log()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # DDP for world > 1, the model as it is for one worker; it already sits on self.device
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def restore(self, fingerprint: str) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as folder:
            with open(os.path.join(folder, checkpoint.FILE), "rb") as f:
                return checkpoint.from_bytes(f.read(), f"{ckpt.path}/{checkpoint.FILE}", fingerprint)

    def settle(self, row: dict) -> None:
        """Rank 0, before it builds this epoch's checkpoint: record in the row (and so in the history) how long the
        previous epoch's checkpoint took to be uploaded and registered after its report (`report` waits for it),
        and the epoch Ray Train had registered then: the previous one, always."""
        row["checkpoint_wait_seconds"], row["registered_epoch"] = self._waited, self._registered_epoch

    def report(self, row: dict, ckpt: bytes | None, history: list[dict], ended: bool = False) -> None:
        """ended: training stops after this epoch (its last, or patience ran out); written beside the
        checkpoint so that a run whose driver was lost can tell a finished training from one stopped midway."""
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        if ckpt is None:  # ranks other than 0: metrics only (every rank must call report, it is a barrier)
            ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))})
            return
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        folder = tempfile.mkdtemp(prefix="macrid-ckpt-")  # Ray deletes it once uploaded
        with open(os.path.join(folder, checkpoint.FILE), "wb") as f:
            f.write(ckpt)
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump({k: row[k] for k in ("epoch", "step")} | {"history": history, "ended": ended}, f)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
        # The next epoch starts only once Ray Train has registered this checkpoint: a restart (node loss, resize,
        # cluster loss) resumes from the last registered one, so it redoes the epoch in progress and nothing more,
        # and no upload is left pending in this rank's /tmp. The other ranks do not wait here (they meet rank 0 at
        # the next epoch's first collective); the cost is the upload's time, recorded in the next epoch's row.
        t_wait = time.perf_counter()
        registered = ray.train.get_all_reported_checkpoints()
        self._waited = time.perf_counter() - t_wait
        self._registered_epoch = max((c.metrics.get("epoch", 0) for c in registered), default=0)


def _quiet_report_log() -> None:
    """Ray Train logs every report at INFO ("Reporting training result N: TrainingReport(...)" per rank and
    epoch), which repeats what our own epoch line says; keep its warnings and errors only."""
    try:
        from ray.train.v2._internal.execution import context as ray_context  # the logger is named by the file
    except ImportError:  # another Ray layout: nothing to quieten
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
