import os
import sys

import pytest

# The tests import helpers (multiproc) as top-level modules, also from spawned ranks.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from multiproc import cleanup_shm  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_shm():
    yield
    cleanup_shm()
