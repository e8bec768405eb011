"""The live steering service on Ray Serve: `steering.Steering` behind HTTP, and the page at `/`.

    POST /recommend   {"user": "42"} | {"items": ["1", "50"]}, optional "weights", "edits", "top_n" -> JSON
    GET  /concepts    each concept's size, typical items and majority genre
    GET  /traverse    ?dim=j&item=ID | ?dim=j&user=ID&component=k [&steps=8]
    GET  /healthz     the model loaded, and whether the lake still answers (user lookups need it)
    GET  /metrics     Prometheus: requests, errors and latency by endpoint; the model's run and epoch
    GET  /            the page (macrid/output/static/steer.html: no build step, nothing loaded from elsewhere)

Errors are `{"error": "..."}` with a 4xx status (503 when the lake is needed and unreachable); request bodies
over MAX_BODY_BYTES are refused with 413 before they are parsed. `build` is the entry point of a Serve config
(`infra/serve/macrid-serve.yaml`: `import_path: macrid.output.serve_app:build`).
"""


import json
import logging
import os
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve

from macrid.output.steering import BadRequest, load

MAX_BODY_BYTES = 64 * 1024  # a session of MAX_SESSION_ITEMS IDs with weights and edits fits in far less
app = FastAPI(title="macrid steering", docs_url=None, redoc_url=None, openapi_url=None)


# helpers first: Serve pickles the deployment class when it is decorated, with the globals defined by then
def _refuse(status: int, message: str):
    raise BadRequest(status, message)


def _parsed(raw: bytes) -> object:
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"the body is not valid JSON ({str(e)[:120]})") from None


def _no_constant(name: str):
    raise BadRequest(400, f"the body holds {name}, which is not a number in JSON; send finite numbers")


@serve.deployment(name="macrid-steering", ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class SteeringService:
    def __init__(self, lake: str, run: "str | None" = None, model: "str | None" = None):
        self.core = load(lake, run, model)
        self.registry = CollectorRegistry()
        self.requests = Counter("macrid_serve_requests", "requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("macrid_serve_latency_seconds", "time to answer, by endpoint", ["endpoint"],
                                 registry=self.registry, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        info = Gauge("macrid_serve_model_epoch", "the served model's epoch, labelled with its run", ["run"],
                     registry=self.registry)
        info.labels(self.core.info.run).set(self.core.info.epoch)
        self.page = resources.files("macrid.output").joinpath("static/steer.html").read_text()

    def _answer(self, endpoint: str, work) -> Response:
        t0 = time.perf_counter()
        try:
            body, status = work(), 200
        except BadRequest as e:
            body, status = {"error": str(e)}, e.status
        except Exception:  # noqa: BLE001 - a fault of ours: logged with its traceback, answered as JSON
            logging.getLogger(__name__).exception("%s failed", endpoint)
            body, status = {"error": f"internal error answering {endpoint}; the service log has the details"}, 500
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return JSONResponse(body, status_code=status)

    @app.post("/recommend")
    async def recommend(self, request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return self._answer("/recommend", lambda: _refuse(413, f"the body is over {MAX_BODY_BYTES} bytes"))
        raw = b""
        async for chunk in request.stream():  # counted as it arrives: a body without a length is bounded too
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                return self._answer("/recommend", lambda: _refuse(413, f"the body is over {MAX_BODY_BYTES} bytes"))
        return self._answer("/recommend", lambda: self.core.recommend(_parsed(raw)))

    @app.get("/concepts")
    def concepts(self) -> Response:
        return self._answer("/concepts", self.core.concepts)

    @app.get("/traverse")
    def traverse(self, request: Request) -> Response:
        return self._answer("/traverse", lambda: self.core.traverse(dict(request.query_params)))

    @app.get("/healthz")
    def healthz(self) -> Response:
        reachable, why = self.core.lake_reachable()
        return JSONResponse({"model": "loaded", **self.core.model_record(),
                             "lake": "reachable" if reachable else f"unreachable: {why}",
                             "answers": "all requests" if reachable else "item sessions only (user lookups need the lake)"})

    @app.get("/metrics")
    def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    def index(self) -> Response:
        return HTMLResponse(self.page)


def build(args: dict) -> serve.Application:
    """The application for `serve run` / `serve deploy`: args lake, and run or model (a model alias)."""
    lake = args.get("lake") or os.environ.get("MACRID_LAKE")
    if not lake:
        raise ValueError("the Serve config's args need lake (or MACRID_LAKE), and run or model")
    return SteeringService.bind(lake, args.get("run"), args.get("model"))
