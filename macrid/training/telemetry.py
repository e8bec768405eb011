"""Prometheus metrics for training, served over HTTP by every rank: rank r on `run.metrics_port + r`, at
`run.metrics_host` (default 0.0.0.0: on a cluster, Prometheus scrapes each worker node from outside it;
use 127.0.0.1 on a laptop or a shared machine). A taken port moves to the next free one, logged.

Per-rank endpoints rather than `ray.util.metrics`: they need no Ray metrics agent (the same code
serves in-process runs), scrape within a second of a change, and a rank that stalls shows as one
flat series. Names follow Prometheus conventions: a `macrid_train_` prefix, base units in the
name, `_total` on counters; every series carries `run` and `rank` labels. Rates come from the
counters (`rate(macrid_train_users_total[1m])` is users/s); gauges only hold last values. Each
run gets its own registry, so several runs in one process do not collide. The names and units
are listed in docs/distributed.md.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, pushadd_to_gateway, start_http_server

from macrid.errors import ConfigError

PORT_TRIES = 16  # a taken port moves the endpoint up to this many ports higher (logged)


class TrainMetrics:
    def __init__(self, port: int, run: str, rank: int = 0, host: str = "0.0.0.0"):
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
        self.server, self.thread, self.port = _serve(port, host, self.registry, rank)

    def on_step(self, users: int) -> None:
        """Host-side counters only: nothing here reads a device tensor."""
        self.steps.inc()
        self.users.inc(users)

    def on_epoch(self, row: dict) -> None:
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


def _serve(port: int, host: str, registry: CollectorRegistry, rank: int):
    """Serve on host:port, or the next free port when it is taken (logged, so the scrape config can follow)."""
    for candidate in range(port, min(port + PORT_TRIES, 65536)):
        try:
            server, thread = start_http_server(candidate, addr=host, registry=registry)
        except OSError as e:
            if e.errno not in (98, 48):  # EADDRINUSE on Linux, macOS
                raise ConfigError(f"run.metrics_host={host!r}, run.metrics_port={port}: cannot serve metrics "
                                  f"({e}); pass an address of this machine, or 0.0.0.0") from None
            continue
        if candidate != port:
            logging.getLogger(__name__).warning("rank %d: metrics port %d is taken; serving Prometheus metrics on "
                                                "%s:%d instead", rank, port, host, candidate)
        return server, thread, candidate
    raise ConfigError(f"run.metrics_port={port}: ports {port} to {port + PORT_TRIES - 1} are all taken on this "
                      "machine; pick another --metrics-port")


EXPORT_JOB = "macrid_export"


def push_export(gateway: str, name: str, summary: dict | None, duration: float) -> None:
    """Push one export run's outcome to a Prometheus Pushgateway (job macrid_export, label export=<name>).

    summary None means the run failed: only the failure time and the duration are pushed. pushadd
    (POST) replaces only the series it sends, so a failure leaves the last success time as it was,
    which is what the staleness alert in infra/prometheus/alerts.yaml watches."""

    registry = CollectorRegistry()

    def gauge(metric: str, doc: str, value: float) -> None:
        Gauge(metric, doc, registry=registry).set(value)

    gauge("macrid_export_duration_seconds", "wall time of the last export run", duration)
    if summary is None:
        gauge("macrid_export_last_failure_timestamp_seconds", "Unix time of the last failed export", time.time())
    else:
        counts = summary["counts"]
        gauge("macrid_export_users", "users exported by the last successful run", counts["users_exported"])
        gauge("macrid_export_interactions", "input interactions read by the last successful run",
              counts["interactions_input"])
        gauge("macrid_export_items_dropped", "interactions with items outside the run's vocabulary, dropped",
              counts["interactions_dropped"])
        gauge("macrid_export_users_without_known_items", "input users with no item of the run's vocabulary",
              counts["users_without_known_items"])
        gauge("macrid_export_last_success_timestamp_seconds", "Unix time of the last successful export", time.time())
    pushadd_to_gateway(gateway, job=EXPORT_JOB, registry=registry, grouping_key={"export": name}, timeout=10)


NIGHTLY_JOB = "macrid_nightly"


def push_nightly(gateway: str, model: str, night) -> None:
    """Push one night's outcome (macrid.nightly.Night) to a Pushgateway: job macrid_nightly, label model=<alias>.

    Every stage that ran gets its duration and whether it succeeded; the gate its decision (1 promoted,
    0 refused) and z; the night its success or failure time (pushadd keeps the other one, as for the export)."""

    registry = CollectorRegistry()
    seconds = Gauge("macrid_nightly_stage_seconds", "wall time of the stage in the last night", ["stage"],
                    registry=registry)
    ok = Gauge("macrid_nightly_stage_ok", "1 when the stage succeeded in the last night, 0 when it failed or refused",
               ["stage"], registry=registry)
    for stage, secs in night.seconds.items():
        seconds.labels(stage).set(secs)
        ok.labels(stage).set(0.0 if stage == night.stopped_at else 1.0)
    if night.decision is not None:
        Gauge("macrid_nightly_gate_promoted", "1 when the last gate promoted its candidate, 0 when it refused",
              registry=registry).set(1.0 if night.decision["promoted"] else 0.0)
        z = night.decision.get("z")
        if isinstance(z, float) and z == z and abs(z) != float("inf"):
            Gauge("macrid_nightly_gate_z", "z of the last gate's paired NDCG@100 difference",
                  registry=registry).set(z)
    name = "success" if night.stopped_at is None else "failure"
    Gauge(f"macrid_nightly_last_{name}_timestamp_seconds", f"Unix time of the last night that ended in {name}",
          registry=registry).set(time.time())
    pushadd_to_gateway(gateway, job=NIGHTLY_JOB, registry=registry, grouping_key={"model": model}, timeout=10)
