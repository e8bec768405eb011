"""Typed, frozen configuration. TOML files and `--set section.key=value` overrides.

A misspelled key is an error, never a silent default: every dict is checked
against the dataclass fields before it is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import tokenize
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macrid.errors import ConfigError, from_os_error
from macrid.names import check_name, check_version

MODELS = ("macridvae", "multvae", "multdae")
PRECISIONS = ("fp32", "tf32", "bf16")
DATA_MODES = ("auto", "memory", "cache", "stream", "ray")


def _check_ranges(section: str, obj, rules: dict[str, tuple[float, float, bool]]) -> None:
    """rules: key -> (low, high, high inclusive); low is inclusive. NaN and infinities are out of range."""
    for key, (lo, hi, hi_inclusive) in rules.items():
        v = getattr(obj, key)
        ok = math.isfinite(v) and v >= lo and (v <= hi if hi_inclusive else v < hi)
        if not ok:
            upper = f"{hi:g}]" if hi_inclusive else (f"{hi:g})" if math.isfinite(hi) else "inf)")
            raise ConfigError(f"{section}.{key}={v!r} is out of range: it must lie in [{lo:g}, {upper}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "macridvae"  # "macridvae", or a baseline: "multvae" (beta-MultVAE) or "multdae"
    K: int = 7  # concepts (MacridVAE only; 1 for the Mult* baselines)
    D: int = 100  # dimension of one component / of the item representations
    tau: float = 0.1  # cosine temperature, Eq. 6 and the decoder
    # Eq. 6's temperature alone, when it should differ from the decoder's tau (0: tau, as the paper has it);
    # the decoder and the KL are unchanged by it (benchmarks/concepts.md: what sharpens c_i)
    concept_tau: float = 0.0
    sigma0: float = 0.1  # prior std, Eq. 7
    dropout: float = 0.5  # input dropout
    # Eq. 6's similarity between items and prototypes: "cosine" (the paper) or "inner" (h_i . m_k / tau, the
    # ablation of Fig. 2e, which the paper reports collapses most items onto one concept)
    similarity: str = "cosine"
    gumbel: bool = True  # relaxed Gumbel-softmax concept sample in training (else the softmax)
    sample: bool = True  # draw z ~ q(z|x) in training (False uses mu: for exactness tests and ablations)
    hidden: int = 100  # Mult* encoder hidden width; the paper's 2*M*d budget keeps it = D
    # MacridVAE: after this epoch, move the prototypes to spherical k-means centres of the item vectors h_i
    # (k-means++ seeding; macrid/model/prototypes.py); 0 = never
    proto_init_epoch: int = 0
    # MacridVAE, with proto_init_epoch: after every later epoch, one Lloyd step from the current prototypes
    # (each moves to the mean direction of the items nearest to it); keeps prototypes at their clusters' centres
    proto_refine: bool = False
    # MacridVAE's prior in the KL: "standard" (N(0, sigma0^2), the paper) or "composite" (RecVAE, Shenbin et al.
    # 2020: per dimension 3/20 N(0, sigma0^2) + 3/4 q_old(z|x) + 1/10 N(0, e^10), q_old = the encoder as it was
    # at the start of the epoch; the KL is then a one-sample Monte Carlo estimate)
    prior: str = "standard"
    # MacridVAE: residual layers g <- g + tanh(W g + b), shared across the K components, between Eq. 7's
    # tanh(pooled + t_bias) and f_nn (a deeper encoder, after RecVAE); each adds D^2 + D parameters; 0 = the paper
    encoder_layers: int = 0
    # MacridVAE: a learnt per-item bias b_i added to log p(i|u) (MultVAE's decoder has one; the paper's does not)
    item_bias: bool = False

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ConfigError(f"model.name={self.name!r} is unknown; use one of {MODELS}")
        if self.encoder_layers < 0:
            raise ConfigError(f"model.encoder_layers={self.encoder_layers} must be >= 0")
        if self.K < 1 or self.D < 1:
            raise ConfigError(f"model.K and model.D must be >= 1 (got K={self.K}, D={self.D})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must lie in [0, 1)")
        if self.prior not in ("standard", "composite"):
            raise ConfigError(f"model.prior={self.prior!r} must be 'standard' or 'composite'")
        if self.similarity not in ("cosine", "inner"):
            raise ConfigError(f"model.similarity={self.similarity!r} must be 'cosine' or 'inner'")
        _check_ranges("model", self, {"hidden": (1, math.inf, False), "proto_init_epoch": (0, math.inf, False)})
        if not (math.isfinite(self.tau) and math.isfinite(self.sigma0)) or self.tau <= 0 or self.sigma0 <= 0:
            raise ConfigError("model.tau and model.sigma0 must be > 0")
        if not math.isfinite(self.concept_tau) or self.concept_tau < 0:
            raise ConfigError(f"model.concept_tau {self.concept_tau} must be > 0, or 0 for model.tau")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"  # "adam" or "sgd" (plain SGD: its step is proportional to the gradient)
    lr: float = 1e-3  # Adam's (or SGD's) learning rate
    lr_schedule: str = "constant"  # "constant", or "cosine": from lr down to 0 over the run's epochs (per update)
    weight_decay: float = 0.0  # L2 on all parameters (Adam's coupled form = lam*||w||^2/2 in the loss)
    batch_size: int = 500  # users per optimizer step (global, across all workers)
    epochs: int = 50  # passes over the training users; the best epoch on validation NDCG@100 is kept
    beta: float = 0.2  # KL weight cap (Eq. 5)
    anneal_epochs: float = 10.0  # "linear": beta rises linearly from 0 to its cap over this many epochs
    # "linear" (over anneal_epochs) or "authors" (the MacridVAE code's: beta = min(cap, step / (5 * steps per
    # epoch)), so it reaches its cap after 5 * cap epochs whatever anneal_epochs says)
    anneal: str = "linear"
    negatives: int = 0  # sampled softmax: S negatives per batch (0 = full softmax over all M items)
    proposal_alpha: float = 0.0  # negatives drawn with Q ∝ (train count + 1)^alpha; 0 = uniform
    # which items each user is scored on under sampling: "batch" = every item of the batch's users plus
    # the negatives (C grows with the batch); "user" = the user's own items plus the shared negatives
    # (cost B*S + N, flat in M and in the batch's item spread); MacridVAE only
    candidates: str = "batch"
    # with sampled softmax, MacridVAE's item tables get sparse gradients, a row-wise exchange across
    # workers and lazy Adam (macrid/model/row_sparse.py); false = dense tables, for comparison only
    row_sparse: bool = True
    ema: float = 0.0  # decay of an exponential moving average of the weights used for evaluation; 0 = off
    # RecVAE's beta' = gamma * |x_u|: each user's KL weighted by |x_u| / (the batch's mean |x_u|)
    kl_by_items: bool = False
    # RecVAE's alternating updates: each epoch makes this many passes that update the encoder only, then
    # one pass that updates the decoder only (item embeddings h and prototypes m; MultVAE: its output
    # layer), without input dropout. 0 = every step updates everything. An epoch costs (alternate + 1) passes.
    alternate: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("optim.batch_size and optim.epochs must be >= 1")
        _check_ranges("optim", self, {"weight_decay": (0, math.inf, False), "beta": (0, math.inf, False),
                                      "anneal_epochs": (0, math.inf, False), "proposal_alpha": (0, math.inf, False),
                                      "ema": (0, 1, False)})
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optim.optimizer={self.optimizer!r} must be 'adam' or 'sgd'")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.lr_schedule={self.lr_schedule!r} must be 'constant' or 'cosine'")
        if self.anneal not in ("linear", "authors"):
            raise ConfigError(f"optim.anneal={self.anneal!r} must be 'linear' or 'authors'")
        if self.candidates not in ("batch", "user"):
            raise ConfigError(f"optim.candidates={self.candidates!r} must be 'batch' or 'user'")
        if self.alternate < 0:
            raise ConfigError(f"optim.alternate={self.alternate} must be >= 0 (0 = no alternating updates)")
        if self.negatives < 0:
            raise ConfigError(f"optim.negatives={self.negatives} must be >= 0 (0 = full softmax)")
        if self.negatives > 0 and self.row_sparse and self.weight_decay > 0:
            raise ConfigError("optim.weight_decay > 0 needs dense item tables under sampled softmax (sparse "
                              "gradients take no weight decay); set optim.row_sparse=false or weight_decay=0")


@dataclass(frozen=True)
class DataConfig:
    lake: str = "lake"  # root of the lake: a local folder (object storage comes with the lake module)
    dataset: str = "synthetic"  # <lake>/datasets/<dataset>
    # the dataset's version a run reads from its first epoch to its last; "" = the current one when the run
    # starts (the driver pins it, and a resumed run keeps the version it started on)
    version: str = ""

    def __post_init__(self) -> None:
        check_name("dataset", self.dataset)
        if self.version:
            check_version(self.version)


@dataclass(frozen=True)
class RunConfig:
    name: str = ""  # run folder name under <lake>/runs/; empty = <dataset>-<model>-<timestamp>
    seed: int = 98765  # initial weights, batch order, dropout and sampling
    num_workers: int = 1  # Ray Train workers (DDP); optim.batch_size is split across them
    # elastic training: 0 = exactly num_workers; 1 <= min_workers < num_workers = go on with as few as
    # min_workers when nodes are lost (restarting from the last checkpoint), and grow back to num_workers
    # as capacity returns (docs/distributed.md, "Elastic workers")
    min_workers: int = 0
    resize_check_s: float = 60.0  # elastic: how often Ray Train looks for capacity to grow the group
    threads: int = 0  # torch intra-op threads per worker; 0 = the CPUs Ray gives the worker
    eval_every: int = 1  # validate every this many epochs
    eval_users: int = 0  # evaluate a fixed random sample of this many held-out users; 0 = all of them
    patience: int = 0  # stop after this many validations without improvement; 0 = never
    progress: bool = True  # progress bar while training
    resume: bool = False  # continue the run in <lake>/runs/<name> from its latest checkpoint
    max_failures: int = 2  # Ray Train restarts after a worker dies; each restart resumes from the checkpoint
    # where Ray places the workers: "PACK" (as few nodes as possible: GPUs of one node talk over NVLink) or
    # "SPREAD" (one per node where it can: a lost node takes one rank, not all; spot and autoscaling clusters)
    placement: str = "PACK"
    # training input (docs/distributed.md): "memory" (each worker reads its 1/W share of the users from the
    # lake and permutes it in RAM), "cache" (the share read once through Ray Data, then in RAM), "stream"
    # (Ray Data every epoch through a seeded shuffle buffer; "ray" is the old name), or "auto": memory when
    # a worker's share fits run.memory_budget_gb, stream above
    data: str = "auto"
    memory_budget_gb: float = 4.0  # "auto": the most a worker may hold of the training bags (11 B per interaction, measured)
    metrics_port: int = 0  # Prometheus endpoints: rank r serves on metrics_port + r; 0 = off
    # the address the endpoints listen on: 0.0.0.0 (all interfaces, so Prometheus can scrape the worker nodes
    # of a cluster) or 127.0.0.1 (this machine only: a laptop, a shared host)
    metrics_host: str = "0.0.0.0"
    use_gpu: bool = False  # GPU workers (NCCL); CPU workers use gloo
    # CPUs each Ray Train worker reserves; 0 = 1 on a cluster the job joins, or the machine's CPUs / workers
    # when the job starts its own local Ray (a laptop). torch uses that many threads unless run.threads is set.
    cpus_per_worker: float = 0.0
    gpus_per_worker: float = 1.0  # with use_gpu
    device: str = "auto"  # in-process runs (--in-process): "auto" (cuda if present), "cpu", "cuda", "cuda:1"
    # "fp32"; "tf32" (TF32 matmuls on CUDA, fp32 on CPU); "bf16" (bf16 autocast for the matmuls; the loss,
    # log-sum-exp, KL and evaluation stay fp32: docs/distributed.md)
    precision: str = "fp32"
    # warm start (jobs/train.py --warm-start): the finished run of this lake whose model this run starts from,
    # items matched by ID across vocabularies (macrid/training/warm_start.py); "" = fresh weights
    warm_start: str = ""
    # with warm_start: re-cluster the carried prototypes at model.proto_init_epoch and refine them (model.proto_refine)
    # anyway; concepts then drift from one night to the next. false keeps the prototypes where the parent left them
    warm_start_recluster: bool = False
    # with warm_start: the learning rate is optim.lr times this (a fine-tune: on the planted lake 0.25 kept 90-93% of
    # the carried items in their concept, 1.0 with refinement 73-89%; benchmarks/nightly.md)
    warm_start_lr_scale: float = 0.25
    fail_at_step: int = -1  # fault injection for recovery tests: SIGKILL rank fail_rank once at this step
    fail_rank: int = 0  # the rank that fail_at_step kills

    def __post_init__(self) -> None:
        if self.data not in DATA_MODES:
            raise ConfigError(f"run.data={self.data!r} must be one of {DATA_MODES}")
        if self.num_workers < 1:
            raise ConfigError("run.num_workers must be >= 1")
        if not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"run.min_workers={self.min_workers} must be between 0 (fixed workers) and "
                              f"run.num_workers={self.num_workers}; --num-workers MIN-MAX sets both")
        if self.resize_check_s <= 0:
            raise ConfigError(f"run.resize_check_s={self.resize_check_s} must be > 0 (seconds)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"run.precision={self.precision!r} must be one of {PRECISIONS}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ConfigError("run.cpus_per_worker and run.gpus_per_worker must be >= 0")
        _check_ranges("run", self, {"eval_every": (1, math.inf, False), "eval_users": (0, math.inf, False),
                                    "threads": (0, math.inf, False), "patience": (0, math.inf, False),
                                    "max_failures": (0, math.inf, False), "memory_budget_gb": (0, math.inf, False),
                                    "metrics_port": (0, 65535, True)})
        if self.memory_budget_gb <= 0:
            raise ConfigError(f"run.memory_budget_gb={self.memory_budget_gb} must be > 0 (GB a worker may hold)")
        if 0 < self.metrics_port < 1024:
            raise ConfigError(f"run.metrics_port={self.metrics_port} is a privileged port; use 1024 to 65535, "
                              "or 0 for no metrics")
        if self.metrics_port + self.num_workers - 1 > 65535:
            raise ConfigError(f"run.metrics_port={self.metrics_port}: ranks serve on metrics_port + rank, and "
                              f"{self.num_workers} workers would pass 65535; pick a lower port")
        if not (math.isfinite(self.warm_start_lr_scale) and self.warm_start_lr_scale > 0):
            raise ConfigError(f"run.warm_start_lr_scale={self.warm_start_lr_scale} must be > 0 (1 = optim.lr as it is)")
        if self.name:
            check_name("run", self.name)
        if self.warm_start:
            check_name("run.warm_start", self.warm_start)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"run.device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.placement not in ("PACK", "SPREAD"):
            raise ConfigError(f"run.placement={self.placement!r} must be 'PACK' or 'SPREAD'")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.optim.candidates == "user" and self.model.name != "macridvae":
            raise ConfigError(f"optim.candidates='user' is implemented for macridvae only, not {self.model.name}; "
                              "use optim.candidates='batch'")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Config":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted(sections)}")
        built = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory  # the dataclass itself
            values = raw.get(f.name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{f.name}] must be a table of key = value")
            known = {g.name for g in dataclasses.fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise ConfigError(
                    f"{source}: unknown key(s) {sorted(f'{f.name}.{b}' for b in bad)}; "
                    f"known keys of [{f.name}]: {sorted(known)}"
                )
            try:
                built[f.name] = section_cls(**{k: _coerce(section_cls, k, v, source, f.name) for k, v in values.items()})
            except TypeError as e:
                raise ConfigError(f"{source}: [{f.name}]: {e}") from e
        return cls(**built)


def _coerce(section_cls: type, key: str, value: Any, source: str, section: str) -> Any:
    """Check a value against the field's declared type (int accepted for float)."""
    default = next(f for f in dataclasses.fields(section_cls) if f.name == key).default
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(
            f"{source}: {section}.{key}={value!r} should be {want.__name__}, got {type(value).__name__}"
        )
    return value


def parse_override(text: str) -> tuple[str, str, Any]:
    """'optim.lr=3e-4' -> ('optim', 'lr', 0.0003). Values are parsed as TOML scalars, else strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=3e-4")
    path, value = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return section, key, parsed


def read_toml(path: str | Path, what: str, examples: str) -> dict[str, Any]:
    """A TOML file as a dict, or a ConfigError that names the file (missing, or not valid TOML)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist; see {examples} for examples") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); TOML files are UTF-8: save it "
                          "as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except OSError as e:  # a folder, no permission, ...

        problem = from_os_error(e, str(path))
        if problem is None:
            raise
        raise ConfigError(f"{what} {problem}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- TOML file <- overrides, validated once."""
    raw: dict[str, dict[str, Any]] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = read_toml(path, "config file", "configs/")
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return Config.from_dict(raw, source=source + (" + overrides" if overrides else ""))


def to_toml(cfg: Config, header: str = "", explain: bool = False) -> str:
    """The config as a TOML file that `load_config` (and `jobs/train.py --config`) reads back as it is.

    explain: put each key's comment from this module above it (`jobs/train.py --print-config`)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for f in dataclasses.fields(cfg):
        comments = key_comments(f.default_factory) if explain else {}
        lines += ["", f"[{f.name}]"]
        for key, value in dataclasses.asdict(getattr(cfg, f.name)).items():
            lines += [f"# {line}" for line in comments.get(key, [])]
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def key_comments(section_cls: type) -> dict[str, list[str]]:
    """The comment lines written above, and at the end of, each field of a config dataclass in this file."""
    comments: dict[str, list[str]] = {}
    pending: list[str] = []
    try:
        source = inspect.getsource(section_cls)
    except OSError:  # installed without its .py sources: the keys are still written, without comments
        return comments
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    line_tokens: list[tokenize.TokenInfo] = []
    for tok in tokens:
        if tok.type not in (tokenize.NEWLINE, tokenize.NL):
            line_tokens.append(tok)
            continue
        kinds = [t.type for t in line_tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
        texts = [t.string for t in line_tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
        if kinds == [tokenize.COMMENT]:
            pending.append(texts[0].lstrip("#").strip())
        elif len(kinds) > 2 and kinds[0] == tokenize.NAME and texts[1] == ":":  # `name: type = default  # ...`
            trailing = [t.string.lstrip("#").strip() for t in line_tokens if t.type == tokenize.COMMENT]
            comments[texts[0]] = pending + trailing
            pending = []
        else:
            pending = []
        line_tokens = []
    return comments


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise ConfigError(f"cannot write {value!r} to TOML")
