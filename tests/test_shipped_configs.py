"""Every example config shipped in peaknet/data/configs parses and validates against its stage."""
from __future__ import annotations

import pathlib

import pytest

from peaknet.cli import STAGES
from peaknet.config import load_config

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "peaknet/data/configs").glob("*.toml"))
# file name prefix -> stage
PREFIX = {"pretrain": "train"}


def _stage(path: pathlib.Path) -> str:
    for name in sorted(STAGES, key=len, reverse=True):
        if path.stem.startswith(name + "-") or path.stem == name:
            return name
    head = path.stem.split("-")[0]
    return PREFIX.get(head, head)


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_parses(path):
    stage = _stage(path)
    assert stage in STAGES, f"{path.name}: no registered stage {stage!r}"
    cfg_cls, _ = STAGES[stage].load()
    load_config(cfg_cls, path)
