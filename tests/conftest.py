"""Shared fixtures. Shared plain helpers (tiny configs, the audit config, metrics readers, the
experiment-script loader) are in ``tests/helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# re-exported for tests written before tests/helpers.py existed; import from tests.helpers
from tests.helpers import tiny_config, tiny_raw

__all__ = ["cache_env", "tiny_config", "tiny_raw"]

torch.set_num_threads(1)


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$SECUREFED_CACHE`` pointed at a fresh folder of the test (feature nets, public models)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("SECUREFED_CACHE", str(d))
    return d
