"""Where the shared real data is: ``shared/data/real`` beside the checkout (or inside it).

Tests that need it call :func:`real_data`. Without the data they skip, except when
``PEAKNET_REQUIRE_REAL_DATA=1`` (set by ``tools/run_tests.sh``, so CI never skips them silently),
where a missing file fails the test.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]


def real_data_root() -> Optional[Path]:
    """``.../shared/data/real`` if it exists, else None."""
    for base in (ROOT / "shared", ROOT.parent / "shared"):
        if (base / "data" / "real").is_dir():
            return base / "data" / "real"
    return None


def real_data(rel: str) -> Path:
    """The path of ``shared/data/real/<rel>``; skips (or fails in CI) when it is missing."""
    root = real_data_root()
    if root is not None and (root / rel).exists():
        return root / rel
    msg = f"real data {rel} not found in shared/data/real beside or inside the checkout"
    if os.environ.get("PEAKNET_REQUIRE_REAL_DATA") == "1":
        pytest.fail(msg)
    pytest.skip(msg)
