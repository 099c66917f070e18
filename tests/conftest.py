"""Shared fixtures: the repo on sys.path and one tiny cache (benchmark + micro base) for the whole session."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """FCIT_CACHE pointing at a temporary folder, so tests never touch the user's .cache/."""
    path = tmp_path_factory.mktemp("fcit-cache")
    old = os.environ.get("FCIT_CACHE")
    os.environ["FCIT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FCIT_CACHE", None)
    else:
        os.environ["FCIT_CACHE"] = old
