"""One night of the loop: prepare the day's dataset version -> warm-start train from the model alias ->
the promotion gate -> export what the alias points to. The only module that calls every layer (data,
training, output); each stage is the library function its own job calls (prepare, launch or
run_in_process, promote, export), never a copy.

A stage that fails, or a refused promotion, stops the night: the alias and every export table stay as
they were (the gate moves the alias only when it promotes; the export commits only at its end). The
returned `Night` says which stage ended it; jobs/nightly.py turns that into its exit status and pushes
each stage's duration and the gate's outcome to a Pushgateway (training/telemetry.py, push_nightly).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from macrid.cluster import connect
from macrid.config import load_config
from macrid.data.prepare import prepare
from macrid.data.raw_input import sources_of
from macrid.data.readers import read_items
from macrid.data.split import Protocol
from macrid.errors import MacridError, user_error
from macrid.output.export import ExportSpec, export
from macrid.training import registry
from macrid.training.launch import launch, prepare_config
from macrid.training.promote import GateRule, promote
from macrid.training.registry import current_run
from macrid.training.train import run_in_process

log = logging.getLogger(__name__)
STAGES = ("prepare", "train", "promote", "export")


@dataclass(frozen=True)
class NightlySpec:
    lake: str
    inputs: tuple[str, ...]  # today's raw interactions (prepare's --input, repeatable)
    dataset: str  # the dataset a new version of which is prepared tonight
    model: str  # the alias: warm start from it, promote to it, export what it points to
    export: str  # the export's name (<lake>/exports/<export>/)
    date: str = ""  # the export's partition, YYYY-MM-DD ("" = today, UTC)
    config: str = ""  # training config (TOML); "" = configs/synthetic.toml's defaults
    overrides: tuple[str, ...] = ()  # --set section.key=value
    items: str = ""  # item metadata (prepare --items)
    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: str | None = None
    min_rating: float = 4.0
    heldout: float = 0.1
    from_scratch: bool = False  # train without a parent even when the alias has one
    in_process: bool = False  # train in this process (no Ray Train)
    local: bool = False  # prepare and export in this process (small data)
    top_n: int = 100
    gate: object = None  # promote.GateRule; None = the default rule
    gate_users: int = 0  # validation users the gate scores (0: all)


@dataclass
class Night:
    run: str = ""
    parent: str | None = None
    stopped_at: str | None = None  # the stage that failed or refused; None: the night went through
    refused: bool = False
    error: str = ""
    seconds: dict = field(default_factory=dict)  # stage -> wall seconds
    decision: dict | None = None
    export: dict | None = None


def run_night(spec: NightlySpec) -> Night:
    """Run the four stages in order; stop at the first that fails or refuses. Never raises a MacridError."""
    night = Night()
    # the date, the time and a random tail: a re-run of the same night gets a run of its own
    run_name = f"{spec.model}-{spec.date or time.strftime('%Y-%m-%d', time.gmtime())}-" \
               f"{time.strftime('%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:4]}"
    for stage in STAGES:
        t0 = time.time()
        try:
            if stage == "prepare":
                _prepare(spec)
            elif stage == "train":
                night.run, night.parent = run_name, _train(spec, run_name)
            elif stage == "promote":
                decision = _promote(spec, night.run)
                night.decision = dataclasses.asdict(decision)
                print(f"[macrid] {decision.message()}", flush=True)
                if not decision.promoted:
                    night.refused, night.stopped_at = True, stage
            else:
                night.export = _export(spec)
        except (MacridError, OSError) as e:
            if user_error(e) is None:  # a fault of the program: the traceback, not a stage's exit status
                raise
            night.stopped_at, night.error = stage, str(user_error(e))
        finally:
            night.seconds[stage] = round(time.time() - t0, 3)
        if night.stopped_at is not None:
            log.error("nightly: stopped at %s: %s", stage, night.error or "the gate refused the candidate")
            break
    return night


def _prepare(spec: NightlySpec) -> dict:
    sources = sources_of(list(spec.inputs), "auto", spec.user_col, spec.item_col, spec.rating_col)
    items = read_items(spec.items, spec.item_col) if spec.items else None
    if not spec.local:

        connect(dashboard=not spec.in_process)
    return prepare(sources, spec.lake, spec.dataset, Protocol(min_rating=spec.min_rating, heldout=spec.heldout),
                   overwrite=True, items=items, runner="local" if spec.local else "ray")


def _train(spec: NightlySpec, run_name: str) -> str | None:
    """Train tonight's candidate; returns its parent run (None: from scratch)."""
    parent = None
    if not spec.from_scratch:
        pointer = registry.current(spec.lake, spec.model)
        parent = pointer["run"] if pointer else None
        if parent is None:
            log.warning("nightly: model %r has no promoted run yet: training from scratch", spec.model)
    overrides = list(spec.overrides) + [f"data.lake={json.dumps(spec.lake)}", f"data.dataset={json.dumps(spec.dataset)}",
                                        f"run.name={json.dumps(run_name)}"]
    if parent:
        overrides.append(f"run.warm_start={json.dumps(parent)}")
    cfg = load_config(spec.config or _default_config(), overrides)
    if spec.in_process:

        run_in_process(prepare_config(cfg))
    else:

        launch(cfg)
    return parent


def _promote(spec: NightlySpec, run: str):
    return promote(spec.lake, spec.model, run, spec.gate or GateRule(), spec.gate_users)


def _export(spec: NightlySpec) -> dict:
    return export(ExportSpec(lake=spec.lake, run=current_run(spec.lake, spec.model), input=spec.dataset,
                             name=spec.export, date=spec.date, top_n=spec.top_n, local=spec.local), progress=False)


def _default_config() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic.toml")
