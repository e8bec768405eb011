"""Serve a trained run live: recommendations a person steers, over HTTP, with a page at /.

  python jobs/serve.py --lake lake --run ml-1m-run                 # http://127.0.0.1:8000/ on a local Ray
  python jobs/serve.py --lake s3://bucket/lake --model prod --host 0.0.0.0 --replicas 2   # only behind an authenticating proxy

Loads the run's published model (or what the model alias --model points to: jobs/promote.py) once per
replica, with the checks of jobs/explain.py (weights only, the vocabulary fingerprint), and answers:

  POST /recommend   {"user": "42"} or {"items": ["1", "50"]} (a visitor's session, folded in on the spot),
                    optional "weights": {"3": 0.0} (concept 3's items out), "edits": {"3": {"7": 0.4}},
                    "top_n": 10 -> {"items": [{"item", "title", "score", "concept"}], "shares", "model", ...}
  GET  /concepts    each concept's size, most typical items and majority genre
  GET  /traverse    ?dim=7&item=2571 or ?dim=7&user=42&component=3: Sec. 2.4's traversal
  GET  /healthz     the model and whether the lake still answers; GET /metrics: Prometheus
  GET  /            the page: pick a user or click items, move the concept sliders, walk a dimension

It joins the Ray cluster it is pointed at (RAY_ADDRESS, `ray start`) or starts a local one, prints the URL
once the service answers, and runs until interrupted (Ctrl-C, SIGTERM). It binds 127.0.0.1 unless --host
says otherwise: on a cluster, put an authenticating proxy with TLS in front of it (docs/serving.md).
On a cluster you may prefer `serve deploy infra/serve/macrid-serve.yaml` (replicas, autoscaling).
Ray Serve runs in Ray's high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, set here unless the
environment says 0): about twice the requests/s of one replica (benchmarks/serve.md).
Exit status: 0 stopped, 2 bad arguments or model, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import urllib.request

from macrid.errors import MacridError, user_error

APP_NAME = "macrid"
MAX_ONGOING_REQUESTS = 32  # Serve's default is 5: past it the proxy backs off and retries, which at 32 clients on
# 2 cores cut the answers/s from 118 to 10 (benchmarks/serve.md)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", required=True, help="lake root: a folder or s3://bucket/prefix")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a finished run of <lake>/runs (its model.pt)")
    source.add_argument("--model", metavar="NAME", help="the run a model alias points to now (jobs/promote.py)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 behind a proxy with auth)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="replicas of the model (each holds it in memory)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica")
    p.add_argument("--max-ongoing-requests", type=int, default=MAX_ONGOING_REQUESTS,
                   help=f"requests one replica holds at once (default {MAX_ONGOING_REQUESTS}); more wait in Serve's "
                        "proxy. An answer takes about a millisecond of CPU, so a replica can hold many")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Ray's documented high-throughput mode (direct ingress, no separate proxy hop): with it one replica answered
    # 1.9-2.2x the requests/s at 8 clients on ML-1M (benchmarks/serve.md). Read when ray.serve is imported, by every Ray process
    # this job starts; set RAY_SERVE_THROUGHPUT_OPTIMIZED=0 to run without it, and set it on a cluster's pods.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if not 0 < args.port < 65536 or args.replicas < 1 or args.cpus_per_replica <= 0 or args.max_ongoing_requests < 1:
        print("error: --port must be 1..65535, --replicas and --max-ongoing-requests at least 1, --cpus-per-replica "
              "above 0", file=sys.stderr)
        return 2
    from macrid.output.steering import load

    try:
        load(args.lake, args.run, args.model)  # here first: a bad run or alias is exit 2, before Ray starts
    except (MacridError, OSError) as e:
        if user_error(e) is None:
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from macrid.cluster import connect
    from macrid.output.serve_app import SteeringService

    own_ray = connect()
    serve.start(http_options={"host": args.host, "port": args.port})
    service = SteeringService.options(num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
                                      ray_actor_options={"num_cpus": args.cpus_per_replica})
    serve.run(service.bind(args.lake, args.run, args.model), name=APP_NAME, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{shown}:{args.port}/"
    urllib.request.urlopen(url + "healthz", timeout=60).read()
    print(f"serving {args.run or 'model ' + args.model} at {url}  (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if own_ray:  # the Ray this job started goes, with the application (a graceful delete waits ~30 s in Ray's
        ray.shutdown()  # throughput mode for a replica that has nothing in flight)
    else:  # only this application: other applications on a shared cluster keep serving (serve.shutdown would not)
        print("stopping: deleting the application from the cluster's Serve", flush=True)
        serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
