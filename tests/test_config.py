"""The typed config loader: TOML + overrides, type checks, validation, round trip, CLI parsing."""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from peaknet import cli
from peaknet.config import ConfigError, load_config, save_config


@dataclass
class RunSection:
    out: pathlib.Path = pathlib.Path("runs/x")
    frames: int = 10
    detector: Literal["cspad", "epix10ka2m"] = "cspad"
    seed: Optional[int] = None

    def validate(self):
        if self.frames < 0:
            raise ValueError("frames: must be >= 0")


@dataclass
class CellSection:
    cell: tuple[float, float, float, float, float, float] = (10, 10, 10, 90, 90, 90)
    weights: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2])
    scale: float = 1.0
    on: bool = True


@dataclass
class DemoConfig:
    run: RunSection = field(default_factory=RunSection)
    crystal: CellSection = field(default_factory=CellSection)


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[run]\nframes = 5\ndetector = "epix10ka2m"\n[crystal]\nscale = 2\n')
    cfg = load_config(DemoConfig, f, ["run.frames=7", "--crystal.on=false", "run.seed=3"])
    assert cfg.run.frames == 7 and cfg.run.detector == "epix10ka2m" and cfg.run.seed == 3
    assert cfg.crystal.scale == 2.0 and isinstance(cfg.crystal.scale, float)
    assert cfg.crystal.on is False
    assert isinstance(cfg.run.out, pathlib.Path)


def test_list_and_tuple_overrides():
    cfg = load_config(DemoConfig, None, ["crystal.cell=[93,93,130.4,90,90,120]", "crystal.weights=1,2"])
    assert cfg.crystal.cell == (93.0, 93.0, 130.4, 90.0, 90.0, 120.0)
    assert cfg.crystal.weights == [1.0, 2.0]


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("run.frame=3", "run.frame", "did you mean 'frames'"),
        ("run.frames=abc", "run.frames", "expected an integer"),
        ("run.detector=pilatus", "run.detector", "must be one of"),
        ("run.frames=-1", "run.frames", "must be >= 0"),
        ("crystal.cell=[1,2]", "crystal.cell", "expected 6 values"),
        ("nosection.x=1", "nosection", "unknown key"),
    ],
)
def test_errors_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(DemoConfig, None, [override])
    assert info.value.field == key
    assert words in str(info.value)
    assert "command line" in str(info.value)


def test_bad_file_named(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[run\nframes = 1\n")
    with pytest.raises(ConfigError, match="bad.toml.*not valid TOML"):
        load_config(DemoConfig, f)
    with pytest.raises(ConfigError, match="missing.toml.*not found"):
        load_config(DemoConfig, tmp_path / "missing.toml")
    g = tmp_path / "type.toml"
    g.write_text('[run]\nframes = "many"\n')
    with pytest.raises(ConfigError) as info:
        load_config(DemoConfig, g)
    assert info.value.path == str(g) and info.value.field == "run.frames"


def test_save_round_trip(tmp_path):
    cfg = load_config(DemoConfig, None, ["run.frames=3", "crystal.scale=0.5"])
    path = save_config(cfg, tmp_path, "demo")
    assert path.name == "demo.config.toml"
    again = load_config(DemoConfig, path)
    assert again == cfg


def test_cli_aliases_and_overrides():
    stage = cli.Stage("demo", "x:y", "x:z", "demo", aliases={"frames": "run.frames"})
    ns, overrides = cli.parse_stage_args(stage, ["--frames", "4", "--crystal.scale", "2", "--run.seed=1"])
    assert overrides == ["crystal.scale=2", "run.seed=1", "run.frames=4"]
    with pytest.raises(SystemExit):
        cli.parse_stage_args(stage, ["stray"])


def test_cli_help_lists_stages(capsys):
    assert cli.main(["--help"]) == 0
    assert "simulate" in capsys.readouterr().out
    assert cli.main(["no-such-stage"]) == 2
