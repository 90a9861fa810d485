from __future__ import annotations

from pathlib import Path

import pytest

from valueloop.config import Settings, load_settings
from valueloop.simulator import SimulationConfig, generate

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"
ONLINE_RETAIL_CSV = SHARED_DATASETS / "online_retail" / "online_retail.csv.gz"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings with every path under a fresh home folder."""
    return load_settings(env={}, home=tmp_path / "home")


@pytest.fixture(scope="session")
def demo_shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo shop, generated once per test session."""
    out = tmp_path_factory.mktemp("demo_shop")
    generate(out, SimulationConfig(customers=3_000, seed=7))
    return out


def write_text(path: Path, text: str, encoding: str = "utf-8", bom: bool = False) -> Path:
    data = text.encode(encoding)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path
