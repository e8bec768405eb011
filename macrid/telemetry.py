"""Prometheus metrics for training, served over HTTP by every rank: rank r on `run.metrics_port + r`.

Per-rank endpoints rather than `ray.util.metrics`: they need no Ray metrics agent (the same code
serves in-process runs), scrape within a second of a change, and a rank that stalls shows as one
flat series. Names follow Prometheus conventions: a `macrid_train_` prefix, base units in the
name, `_total` on counters; every series carries `run` and `rank` labels. Rates come from the
counters (`rate(macrid_train_users_total[1m])` is users/s); gauges only hold last values. Each
run gets its own registry, so several runs in one process do not collide. The names and units
are listed in docs/distributed.md.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, start_http_server


class TrainMetrics:
    def __init__(self, port: int, run: str, rank: int = 0):
        self.registry = CollectorRegistry()
        labels = {"run": run, "rank": str(rank)}

        def make(kind, name: str, doc: str):
            return kind(name, doc, list(labels), registry=self.registry).labels(**labels)

        self.steps = make(Counter, "macrid_train_steps", "optimizer steps taken by this rank")
        self.users = make(Counter, "macrid_train_users", "training users processed by this rank")
        self.train_seconds = make(Counter, "macrid_train_seconds", "wall time spent in training epochs")
        self.epochs = make(Counter, "macrid_train_epochs", "epochs completed by this rank")
        self.epoch_duration = make(Summary, "macrid_train_epoch_duration_seconds", "wall time of one epoch")
        self.loss = make(Gauge, "macrid_train_loss", "last epoch's mean loss on this rank: NLL + beta * KL, per user")
        self.nll = make(Gauge, "macrid_train_nll", "last epoch's mean reconstruction NLL per user (nats)")
        self.kl = make(Gauge, "macrid_train_kl", "last epoch's mean KL per user (nats)")
        self.beta = make(Gauge, "macrid_train_beta", "current KL weight")
        self.val_ndcg = make(Gauge, "macrid_train_val_ndcg_at_100", "validation NDCG@100 of the last evaluation "
                                                                   "(rank 0)")
        self.server, self.thread = start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def on_step(self, users: int) -> None:
        """Host-side counters only: nothing here reads a device tensor."""
        self.steps.inc()
        self.users.inc(users)

    def on_epoch(self, row: dict, users: int) -> None:
        self.epochs.inc()
        self.train_seconds.inc(row["seconds"])
        self.epoch_duration.observe(row["seconds"])
        self.loss.set(row["loss"])
        self.nll.set(row["nll"])
        self.kl.set(row["kl"])
        self.beta.set(row["beta"])
        if "val_ndcg@100" in row:
            self.val_ndcg.set(row["val_ndcg@100"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
