"""The lake's layout: every path of a dataset, a version, a run, a sweep, an export or a job's scratch
folder is built here, from names that are checked here.

    <lake>/datasets/<dataset>/_meta.json              the pointer to the current version
    <lake>/datasets/<dataset>/versions/<version>/     one snapshot per prepare
    <lake>/runs/<run>/                                a training run, or a sweep (its trials: <sweep>-<trial>)
    <lake>/exports/<export>/<table>/                  the nightly export's Delta tables
    <lake>/models/<model>/                            a model alias: the run it points to, its history
    <lake>/_scratch/<job>-<id>/                       a running job's intermediate files

A name is 1 to 128 of letters, digits, '.', '_' and '-', starting with a letter or a digit, with no
"..": it can never leave its folder (no '/', no '..', not empty), on disk or on S3, and it is safe in
file names, shell commands, Prometheus labels and plot titles. A version name is what prepare writes
(`<UTC time to the µs>Z-<8 hex digits>`), so deletions of old versions touch nothing else.
"""

from __future__ import annotations

from macrid.data import lake
from macrid.errors import DataError
from macrid.names import NAME, check_name, check_version

KEEP_VERSIONS = 3  # a run outlives at most KEEP_VERSIONS - 1 later prepares of its dataset


def dataset_uri(lake_root: str, name: str, version: str = "") -> str:
    """The dataset's root (where the _meta.json pointer lives), or the folder of one version."""
    root = lake.join(lake_root, "datasets", check_name("dataset", name))
    return lake.join(root, "versions", check_version(version)) if version else root


def load_meta(lake_root: str, name: str, version: str = "") -> dict:
    """The _meta.json of a version of a dataset, or of its current version (the pointer) when version is "".

    Refuses a dataset without it (incomplete or not a dataset), and a version that no longer exists."""
    uri = dataset_uri(lake_root, name, version)
    if not lake.exists(f"{uri}/_meta.json"):
        if version:
            raise DataError(
                f"{uri}: version {version} of dataset {name!r} is gone (prepare keeps the newest "
                f"{KEEP_VERSIONS}); start a new run on the current version")
        raise DataError(
            f"{uri}: no _meta.json, so this is not a complete prepared dataset; "
            f"run `python jobs/prepare.py ... --lake {lake_root} --name {name}` first"
        )
    return lake.read_json(f"{uri}/_meta.json")


def snapshot_uri(lake_root: str, name: str, version: str = "") -> str:
    """Where the tables of a version live: its folder; for version "" the current one's (the pointer's),
    or the dataset's root for a dataset of schema 1, which has no versions."""
    if not version:
        version = load_meta(lake_root, name).get("version", "")
    return dataset_uri(lake_root, name, version)


def is_dataset(lake_root: str, name: str) -> bool:
    """Whether `name` is a valid dataset name with a published dataset in the lake."""
    return NAME.fullmatch(name) is not None and ".." not in name and \
        lake.exists(f"{dataset_uri(lake_root, name)}/_meta.json")


def runs_uri(lake_root: str) -> str:
    return lake.join(lake_root, "runs")


def run_uri(lake_root: str, name: str) -> str:
    """A training run's folder, or a sweep's."""
    return lake.join(runs_uri(lake_root), check_name("run", name))


def model_uri(lake_root: str, name: str) -> str:
    """A model alias's folder (current.json, history/)."""
    return lake.join(lake_root, "models", check_name("model", name))


def exports_uri(lake_root: str) -> str:
    return lake.join(lake_root, "exports")


def export_uri(lake_root: str, name: str, table: str = "") -> str:
    """An export's folder, or one of its tables (a fixed name of the export, or `_staging/<id>`)."""
    root = lake.join(exports_uri(lake_root), check_name("export", name))
    return lake.join(root, table) if table else root


def scratch_uri(lake_root: str, job: str) -> str:
    """A running job's private folder (`<job>-<random id>`), deleted when the job ends."""
    return lake.join(lake_root, "_scratch", check_name("scratch", job))
