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
Exit status: 0 stopped, 2 bad arguments or model, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import urllib.request

from macrid.errors import MacridError, user_error


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if not 0 < args.port < 65536 or args.replicas < 1 or args.cpus_per_replica <= 0:
        print("error: --port must be 1..65535, --replicas at least 1, --cpus-per-replica above 0", file=sys.stderr)
        return 2
    from macrid.output.steering import load

    try:
        load(args.lake, args.run, args.model)  # here first: a bad run or alias is exit 2, before Ray starts
    except (MacridError, OSError) as e:
        if user_error(e) is None:
            raise
        print(f"error: {user_error(e)}", file=sys.stderr)
        return 2
    from ray import serve

    from macrid.cluster import connect
    from macrid.output.serve_app import SteeringService

    connect()
    serve.start(http_options={"host": args.host, "port": args.port})
    service = SteeringService.options(num_replicas=args.replicas,
                                      ray_actor_options={"num_cpus": args.cpus_per_replica})
    serve.run(service.bind(args.lake, args.run, args.model), name="macrid", route_prefix="/", blocking=False)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{shown}:{args.port}/"
    urllib.request.urlopen(url + "healthz", timeout=60).read()
    print(f"serving {args.run or 'model ' + args.model} at {url}  (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
