"""The live steering service's answers, without the web framework: a published run in memory, and requests
checked and answered as plain dicts (`jobs/serve.py` puts them behind Ray Serve; `macrid/output/serve_app.py`).

    recommend  {"user": ID} or {"items": [ID, ...]} (a visitor's session, folded in on the spot, Eq. 7), optional
               "weights" {k: w}, "edits" {k: {j: value}}, "top_n" -> the top-N with titles, scores and concepts,
               the user's concept shares and the items left out as their own
    concepts   each concept's size, most typical items (largest c_ik among its items) and majority genre
    traverse   Sec. 2.4's traversal of one dimension: `explain.traversal`, the same code as `jobs/explain.py`

Scores and steering are `traverse.steer`, the function `explain.py steer` uses: an item's concept is its mode
(argmax c_i); weight w_k multiplies A_ui of concept k's items (0 removes them). Every request is checked before
any work: unknown IDs are named, out-of-range concepts and dimensions, non-finite numbers, lists and top_n past
their caps are refused with a 4xx (`BadRequest`), never an exception from deeper down.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import torch

from macrid.data import lake, layout
from macrid.data.batches import snapshot_uri
from macrid.errors import ConfigError, DataError, MacridError
from macrid.output.explain import Run, traversal
from macrid.output.traverse import SteerItems, steer
from macrid.training.registry import current_run
from macrid.training.run_folder import MODEL_FILE

MAX_TOP_N = 100  # larger asks are capped: a page shows tens, and the answer's size stays bounded
MAX_SESSION_ITEMS = 1000  # items of one visitor's session
MAX_WEIGHT = 1e6
MAX_EDIT = 1e3  # |mu_kj| of a unit-norm component is at most 1; edits far past it only saturate the cosine
TYPICAL = 8  # items listed per concept


class BadRequest(Exception):
    """A request the service refuses: `status` (4xx, or 503 when the lake is needed and unreachable) and why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelInfo:
    run: str
    epoch: int
    trained: str  # when model.pt was written (UTC), or "" when the store does not say
    K: int
    D: int
    items: int


class Steering:
    """One published run, loaded once (the checks of `explain`: weights only, the vocabulary fingerprint)."""

    def __init__(self, lake_root: str, run: str):
        self.lake = lake_root
        self.view = Run(lake_root, run)
        self.model = self.view.model.eval()
        v = self.view
        self.items = SteerItems.of(torch.as_tensor(v.h), v.c, v.bias)  # unit rows, c_i, modes: once, not per request
        self.concept = self.items.concept  # (M,) each item's concept, the mode
        # answers are formatted from plain lists: indexing a polars Series per item was half of an answer's time
        self.item_ids = [str(i) for i in v.vocab["item_id"].to_list()]  # (M,) by item_idx
        self.titles = v.vocab["title"].fill_null("").to_list()  # (M,)
        self._concept_of = self.concept.tolist()  # (M,)
        self._index = {i: n for n, i in enumerate(self.item_ids)}
        self.genres = _genres(lake_root, v.record)  # (M,) list of genres, or None
        self.info = ModelInfo(run=run, epoch=int(v.saved["epoch"]), trained=_written_at(lake_root, run), K=v.K, D=v.D,
                              items=len(self.item_ids))

    # -- checks ------------------------------------------------------------------------------------------------

    def item_indices(self, ids: object) -> torch.Tensor:
        if not isinstance(ids, list) or not ids:
            raise BadRequest(400, '"items" must be a non-empty list of item IDs, e.g. ["1", "50"]')
        if len(ids) > MAX_SESSION_ITEMS:
            raise BadRequest(413, f'"items" holds {len(ids)} items; at most {MAX_SESSION_ITEMS} per request')
        unknown = [i for i in ids if not isinstance(i, (str, int)) or isinstance(i, bool) or str(i) not in self._index]
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise BadRequest(404, f"unknown item ID(s) {shown}: not in run {self.info.run!r}'s vocabulary "
                                  f"({self.info.items:,} items, e.g. {self.item_ids[0]!r})")
        return torch.as_tensor(sorted({self._index[str(i)] for i in ids}), dtype=torch.int64)

    def concept_index(self, key: object, what: str) -> int:
        return _bounded_index(key, what, "concept", "K", self.info.K)

    def dimension_index(self, key: object, what: str) -> int:
        return _bounded_index(key, what, "dimension", "D", self.info.D)

    def top_n(self, value: object) -> int:
        if value is None:
            return 10
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(400, f'"top_n" must be an integer, not {value!r}')
        if value < 1:
            raise BadRequest(400, f'"top_n" {value} must be at least 1')
        return min(value, MAX_TOP_N)

    def weights(self, value: object) -> torch.Tensor:
        w = torch.ones(self.info.K)
        if value is None:
            return w
        if not isinstance(value, dict):
            raise BadRequest(400, '"weights" must be an object {concept: weight}, e.g. {"3": 0.0}')
        for key, x in value.items():
            k = self.concept_index(key, '"weights"')
            w[k] = _number(x, f'"weights" of concept {k}', 0.0, MAX_WEIGHT)
        return w

    def edits(self, value: object) -> list[tuple[int, int, float]]:
        if value is None:
            return []
        if not isinstance(value, dict):
            raise BadRequest(400, '"edits" must be an object {concept: {dimension: value}}, e.g. {"3": {"7": 0.4}}')
        out = []
        for key, dims in value.items():
            k = self.concept_index(key, '"edits"')
            if not isinstance(dims, dict):
                raise BadRequest(400, f'"edits" of concept {k} must be an object {{dimension: value}}')
            for dim, x in dims.items():
                j = self.dimension_index(dim, f'"edits" of concept {k}')
                out.append((k, j, _number(x, f'"edits" {k}.{j}', -MAX_EDIT, MAX_EDIT)))
        return out

    # -- answers -----------------------------------------------------------------------------------------------

    def user_items(self, user: object) -> torch.Tensor:
        if not isinstance(user, (str, int)) or isinstance(user, bool) or str(user) == "":
            raise BadRequest(400, '"user" must be a user ID of the dataset, e.g. "42"')
        try:
            return self.view.user_items(str(user))
        except DataError as e:
            if "is not in dataset" in str(e):
                raise BadRequest(404, f"unknown user {str(user)!r}: not in dataset {self.view.record['dataset']!r} "
                                      "the model was trained on; pass one of its user IDs, or the visitor's items") from None
            raise _lake_down(user, e) from None
        except (MacridError, OSError, pa.ArrowException) as e:  # the lake went away after the model was loaded
            raise _lake_down(user, e) from None

    @torch.no_grad()
    def recommend(self, request: object) -> dict:
        if not isinstance(request, dict):
            raise BadRequest(400, 'the body must be a JSON object, e.g. {"user": "42", "top_n": 10}')
        unknown = sorted(set(request) - {"user", "items", "weights", "edits", "top_n"})
        if unknown:
            raise BadRequest(400, f"unknown field(s) {unknown}; the fields are user, items, weights, edits, top_n")
        if ("user" in request) == ("items" in request):
            raise BadRequest(400, 'pass exactly one of "user" (a user ID) or "items" (a list of item IDs)')
        top_n, weights, edits = self.top_n(request.get("top_n")), self.weights(request.get("weights")), \
            self.edits(request.get("edits"))
        own = self.item_indices(request["items"]) if "items" in request else self.user_items(request["user"])
        mu = self.view.components(own)  # (K, D) Eq. 7 from the items
        for k, j, value in edits:
            mu[k, j] = value
        top, scores, concepts = steer(self.items, self.view.tau, mu, own, top_n, weights)
        share = self.view.c[own].sum(0)  # (K,) the user's share of each concept
        share = share / share.sum().clamp_min(1e-12)
        return {
            "items": [self._item(i, s, c) for i, s, c in zip(top.tolist(), scores.tolist(), concepts.tolist())],
            "shares": [round(float(x), 6) for x in share],
            "excluded": [self._item(i) for i in own[:MAX_TOP_N].tolist()],
            "excluded_count": len(own),
            "model": self.model_record(),
        }

    def concepts(self) -> dict:
        out = []
        c = self.view.c  # (M, K)
        for k in range(self.info.K):
            members = torch.nonzero(self.concept == k).flatten()
            typical = members[torch.argsort(c[members, k], descending=True)[:TYPICAL]]
            entry = {"concept": k, "size": len(members),
                     "typical": [self._item(int(i), probability=round(float(c[i, k]), 4)) for i in typical]}
            if self.genres is not None and len(members):
                counts = pl.Series(self.genres.gather(members.numpy()).explode().drop_nulls()).value_counts(sort=True)
                if counts.height:
                    entry["genre"] = counts[0, 0]
                    entry["genre_share"] = round(counts[0, 1] / len(members), 4)
            out.append(entry)
        return {"concepts": out, "model": self.model_record()}

    def traverse(self, params: dict) -> dict:
        dim = self.dimension_index(params.get("dim", "0"), "dim")
        steps = _integer(params.get("steps", "8"), "steps", 2, 20)
        item, user = params.get("item"), params.get("user")
        if (item is None) == (user is None):
            raise BadRequest(400, "pass exactly one of item (an item ID) or user (a user ID, with component)")
        component = self.concept_index(params.get("component", "0"), "component")
        if item is not None:
            self.item_indices([item])
        else:
            self.user_items(user)  # named 404 / 503 before the traversal reads it again
        try:
            result = traversal(self.view, dim, item=item, user=user, component=component, steps=steps)
        except MacridError as e:
            raise BadRequest(400, str(e)) from None
        return result | {"model": self.model_record()}

    def model_record(self) -> dict:
        i = self.info
        return {"run": i.run, "epoch": i.epoch, "trained": i.trained, "K": i.K, "D": i.D}

    def lake_reachable(self) -> tuple[bool, str]:
        """Whether the run's folder still answers (user lookups need the lake; item sessions do not)."""
        try:
            ok = lake.exists(lake.join(layout.run_uri(self.lake, self.info.run), MODEL_FILE))
        except (MacridError, OSError) as e:
            return False, str(e).splitlines()[0][:300]
        return ok, "" if ok else f"{self.lake}: the run's model.pt is gone from the lake"

    def _item(self, idx: int, score: float | None = None, concept: int | None = None, **extra) -> dict:
        out = {"item": self.item_ids[idx], "title": self.titles[idx],
               "concept": self._concept_of[idx] if concept is None else concept}
        if score is not None:
            out["score"] = round(score, 6)
        return out | extra


def _bounded_index(key: object, what: str, noun: str, symbol: str, size: int) -> int:
    """A concept or dimension index from a request, in 0..size-1, or a 400 that names it and the range."""
    try:
        value = int(str(key))
    except ValueError:
        raise BadRequest(400, f"{what}: {noun} {key!r} is not an integer") from None
    if not 0 <= value < size:
        raise BadRequest(400, f"{what}: {noun} {value} is out of range ({symbol} = {size}: 0..{size - 1})")
    return value


def _lake_down(user: object, error: BaseException) -> BadRequest:
    return BadRequest(503, f"the lake could not be read for user {str(user)!r} ({str(error).splitlines()[0][:200]}); "
                           "requests with \"items\" still answer from the loaded model")


def _number(x: object, what: str, lo: float, hi: float) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        raise BadRequest(400, f"{what} must be a finite number, not {x!r}")
    if not lo <= x <= hi:
        raise BadRequest(400, f"{what} {x} is outside [{lo:g}, {hi:g}]")
    return float(x)


def _integer(x: object, what: str, lo: int, hi: int) -> int:
    try:
        value = int(str(x))
    except ValueError:
        raise BadRequest(400, f"{what} {x!r} is not an integer") from None
    if not lo <= value <= hi:
        raise BadRequest(400, f"{what} {value} is outside {lo}..{hi}")
    return value


def _genres(lake_root: str, record: dict) -> pl.Series | None:
    """Each item's genres (by item_idx) from the dataset version the run read, when it has them."""
    try:
        items = pl.from_arrow(lake.read_table(lake.join(snapshot_uri(lake_root, record["dataset"], record["version"]),
                                                        "items"), ["item_idx", "genres"])).sort("item_idx")
    except (MacridError, OSError, KeyError, pl.exceptions.PolarsError):
        return None
    return items["genres"] if items["genres"].null_count() < items.height else None


def _written_at(lake_root: str, run: str) -> str:
    fs, path = lake.resolve(lake.join(layout.run_uri(lake_root, run), MODEL_FILE))
    info = fs.get_file_info(path)
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(info.mtime.timestamp())) if info.mtime else ""


def load(lake_root: str, run: str | None, model: str | None) -> Steering:
    """The service's model: a run, or what a model alias (`jobs/promote.py`) points to."""
    if (run is None) == (model is None):
        raise ConfigError("pass exactly one of --run or --model")
    if model is not None:

        run = current_run(lake_root, model)
    return Steering(lake_root, run)
