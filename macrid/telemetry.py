"""Prometheus metrics for training, served over HTTP by rank 0 (`run.metrics_port`, 0 = off).

Names follow Prometheus conventions: a `macrid_train_` prefix, base units in the name, `_total`
on counters. Each run gets its own registry, so several runs in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class TrainMetrics:
    def __init__(self, port: int, run: str):
        self.registry = CollectorRegistry()
        labels = {"run": run}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, list(labels), registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, list(labels), registry=self.registry).labels(**labels)

        self.steps = counter("macrid_train_steps", "optimizer steps taken")
        self.users = counter("macrid_train_users", "training users processed by this worker")
        self.loss = gauge("macrid_train_loss", "last step's loss: NLL + beta * KL, per user")
        self.nll = gauge("macrid_train_nll", "last step's reconstruction NLL per user (nats)")
        self.kl = gauge("macrid_train_kl", "last step's KL per user (nats)")
        self.beta = gauge("macrid_train_beta", "current KL weight")
        self.lr = gauge("macrid_train_learning_rate", "optimizer learning rate")
        self.epoch = gauge("macrid_train_epoch", "epochs completed")
        self.users_per_second = gauge("macrid_train_users_per_second", "training throughput of the last epoch")
        self.epoch_seconds = gauge("macrid_train_epoch_duration_seconds", "wall time of the last epoch")
        self.val_ndcg = gauge("macrid_train_val_ndcg_at_100", "validation NDCG@100 of the last evaluation")
        self.server, self.thread = start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def on_step(self, users: int, loss: float, parts: dict, lr: float) -> None:
        self.steps.inc()
        self.users.inc(users)
        self.loss.set(loss)
        self.nll.set(parts["nll"])
        self.kl.set(parts["kl"])
        self.beta.set(parts["beta"])
        self.lr.set(lr)

    def on_epoch(self, row: dict, users: int) -> None:
        self.epoch.set(row["epoch"])
        self.epoch_seconds.set(row["seconds"])
        self.users_per_second.set(users / max(row["seconds"], 1e-9))
        if "val_ndcg@100" in row:
            self.val_ndcg.set(row["val_ndcg@100"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
