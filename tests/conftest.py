"""Shared fixtures. Real-data tests find MovieLens through MACRID_DATA (default ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MACRID_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def real_data(name: str) -> Path:
    """Path of a real dataset, or skip with the reason (fail instead when MACRID_REQUIRE_DATA=1, as in CI)."""
    path = DATA / name
    if not path.exists():
        msg = f"real data {path} is absent: set MACRID_DATA to the folder holding {name}/"
        if os.environ.get("MACRID_REQUIRE_DATA") == "1":
            pytest.fail(msg + " (MACRID_REQUIRE_DATA=1 forbids skipping)")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def ml100k_lake(tmp_path_factory) -> str:
    from macrid.prepare import prepare
    from macrid.readers import read_raw
    from macrid.split import Protocol

    lake = str(tmp_path_factory.mktemp("lake"))
    prepare(read_raw(real_data("ml-100k")), lake, "ml-100k", Protocol())
    return lake


@pytest.fixture(scope="session")
def synthetic_lake(tmp_path_factory) -> str:
    from macrid.prepare import prepare
    from macrid.split import Protocol
    from macrid.synthetic import SyntheticSpec, generate

    lake = str(tmp_path_factory.mktemp("lake"))
    prepare(generate(SyntheticSpec(n_users=800, n_items=300, K=4)), lake, "synthetic", Protocol())
    return lake
