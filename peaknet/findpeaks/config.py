"""Typed configuration of the peak-finding stage: peakfinder8 parameters, presets, stage config.

Two levels:

- :class:`Peakfinder8Params` holds concrete values; the algorithm
  (:mod:`peaknet.findpeaks.peakfinder8`) takes only this.
- :class:`Peakfinder8Section` is the ``[peakfinder8]`` table of a TOML config: a ``preset`` name
  plus optional per-key overrides (``None`` = take the preset's value). ``section.params()``
  resolves it to a :class:`Peakfinder8Params`.

Presets follow the defaults seen in the field (``shared/notes/formats-and-algorithms.md``):

============== ========== ======= ======= ======= === ======= ======= ===========
preset         adc_thresh min_snr min_pix max_pix R   min_res max_res ASICs/module
============== ========== ======= ======= ======= === ======= ======= ===========
crystfel       800        5       2       200     3   0       off     1 x 1
cheetah        100        40      3       off     4   0       1e6     1 x 1
om_epix10k2m   100        5       1       30      4   80      800     2 x 2
om_jungfrau4m  250        6       2       30      4   10      1000    2 x 4
lcls_cspad     100        6       2       200     4   0       off     1 x 2
============== ========== ======= ======= ======= === ======= ======= ===========

``lcls_cspad`` is the setting psana's peakfinder8 was run with on the thermolysin CSPAD frames
(``shared/data/real/README.md``). ASICs per module: CSPAD 185 x 388 = 1 x 2 ASICs of 185 x 194,
Epix10ka 352 x 384 = 2 x 2 of 176 x 192, Jungfrau 512 x 1024 = 2 x 4 of 256 x 256. CrystFEL and
Cheetah run per geometry panel, so their presets treat a module as one ASIC.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from dataclasses import dataclass, field
from typing import Literal, Optional

__all__ = [
    "Peakfinder8Params",
    "Peakfinder8Section",
    "FindPeaksRunSection",
    "FindPeaksRaySection",
    "FindPeaksConfig",
    "PRESETS",
    "PresetName",
    "preset",
]

PresetName = Literal["crystfel", "cheetah", "om_epix10k2m", "om_jungfrau4m", "lcls_cspad"]


@dataclass(frozen=True)
class Peakfinder8Params:
    """Concrete peakfinder8 parameters.

    adc_thresh: lowest per-radius threshold (detector units, ADU).
    min_snr: k in the radial threshold ``mean + k std`` and the peak's minimum
        ``total / local_std``.
    min_pix_count, max_pix_count: accepted size of a connected region (``max_pix_count=None``:
        no upper limit).
    local_bg_radius: R; the local background is taken within 2R of the peak's centre.
    min_res, max_res: keep pixels with ``min_res <= r <= max_res`` (pixels from the beam);
        ``max_res=None``: no upper limit.
    max_num_peaks: keep the first peaks found, in scan order (module, ASIC row, ASIC column,
        pixel row, pixel column).
    asics_ss, asics_fs: ASICs per module along slow scan and fast scan; the module shape must
        divide evenly. Region growing and background never cross an ASIC edge, and seeds are
        not taken on an ASIC's outermost pixels.
    """

    adc_thresh: float = 100.0
    min_snr: float = 6.0
    min_pix_count: int = 2
    max_pix_count: Optional[int] = 200
    local_bg_radius: int = 4
    min_res: float = 0.0
    max_res: Optional[float] = None
    max_num_peaks: int = 2048
    asics_ss: int = 1
    asics_fs: int = 1

    def validate(self) -> None:
        """Raise ``ValueError("key: problem")`` for an impossible value."""
        if not math.isfinite(self.adc_thresh):
            raise ValueError(f"adc_thresh: must be finite, got {self.adc_thresh}")
        if not (math.isfinite(self.min_snr) and self.min_snr >= 0):
            raise ValueError(f"min_snr: must be >= 0, got {self.min_snr}")
        if self.min_pix_count < 1:
            raise ValueError(f"min_pix_count: must be >= 1, got {self.min_pix_count}")
        if self.max_pix_count is not None and self.max_pix_count < self.min_pix_count:
            raise ValueError(
                f"max_pix_count: must be >= min_pix_count ({self.min_pix_count}), "
                f"got {self.max_pix_count}"
            )
        if self.local_bg_radius < 1:
            raise ValueError(f"local_bg_radius: must be >= 1, got {self.local_bg_radius}")
        if not (math.isfinite(self.min_res) and self.min_res >= 0):
            raise ValueError(f"min_res: must be >= 0, got {self.min_res}")
        if self.max_res is not None and not (self.max_res > self.min_res):
            raise ValueError(
                f"max_res: must be > min_res ({self.min_res}) or none, got {self.max_res}"
            )
        if self.max_num_peaks < 1:
            raise ValueError(f"max_num_peaks: must be >= 1, got {self.max_num_peaks}")
        if self.asics_ss < 1:
            raise ValueError(f"asics_ss: must be >= 1, got {self.asics_ss}")
        if self.asics_fs < 1:
            raise ValueError(f"asics_fs: must be >= 1, got {self.asics_fs}")

    def replace(self, **changes) -> "Peakfinder8Params":
        """A copy with some values changed (validated)."""
        out = dataclasses.replace(self, **changes)
        out.validate()
        return out


PRESETS: dict[str, Peakfinder8Params] = {
    "crystfel": Peakfinder8Params(
        adc_thresh=800.0, min_snr=5.0, min_pix_count=2, max_pix_count=200,
        local_bg_radius=3, min_res=0.0, max_res=None, max_num_peaks=2048,
    ),
    "cheetah": Peakfinder8Params(
        adc_thresh=100.0, min_snr=40.0, min_pix_count=3, max_pix_count=None,
        local_bg_radius=4, min_res=0.0, max_res=1e6, max_num_peaks=2048,
    ),
    "om_epix10k2m": Peakfinder8Params(
        adc_thresh=100.0, min_snr=5.0, min_pix_count=1, max_pix_count=30,
        local_bg_radius=4, min_res=80.0, max_res=800.0, max_num_peaks=2048,
        asics_ss=2, asics_fs=2,
    ),
    "om_jungfrau4m": Peakfinder8Params(
        adc_thresh=250.0, min_snr=6.0, min_pix_count=2, max_pix_count=30,
        local_bg_radius=4, min_res=10.0, max_res=1000.0, max_num_peaks=2048,
        asics_ss=2, asics_fs=4,
    ),
    "lcls_cspad": Peakfinder8Params(
        adc_thresh=100.0, min_snr=6.0, min_pix_count=2, max_pix_count=200,
        local_bg_radius=4, min_res=0.0, max_res=None, max_num_peaks=2048,
        asics_ss=1, asics_fs=2,
    ),
}


def preset(name: str, **overrides) -> Peakfinder8Params:
    """The named preset (see the module docstring), with optional changes."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown peakfinder8 preset {name!r}; known: {', '.join(PRESETS)}"
        ) from None
    return base.replace(**overrides) if overrides else base


@dataclass
class Peakfinder8Section:
    """``[peakfinder8]``: a preset plus optional overrides of any of its values.

    A key left unset (``None``) takes the preset's value. ``max_pix_count`` and ``max_res``
    cannot be switched off from TOML through this section (unset means "preset"): use
    ``no_max_pix_count`` / ``no_max_res`` for that.
    """

    preset: PresetName = "lcls_cspad"
    adc_thresh: Optional[float] = None
    min_snr: Optional[float] = None
    min_pix_count: Optional[int] = None
    max_pix_count: Optional[int] = None
    no_max_pix_count: bool = False
    local_bg_radius: Optional[int] = None
    min_res: Optional[float] = None
    max_res: Optional[float] = None
    no_max_res: bool = False
    max_num_peaks: Optional[int] = None
    asics_ss: Optional[int] = None
    asics_fs: Optional[int] = None

    def params(self) -> Peakfinder8Params:
        """The concrete parameters: the preset with every set key applied."""
        changes = {}
        for f in dataclasses.fields(Peakfinder8Params):
            value = getattr(self, f.name)
            if value is not None:
                changes[f.name] = value
        if self.no_max_pix_count:
            changes["max_pix_count"] = None
        if self.no_max_res:
            changes["max_res"] = None
        return preset(self.preset, **changes)

    def validate(self) -> None:
        self.params()


@dataclass
class FindPeaksRunSection:
    """``[run]`` of the peak-finding stage.

    inputs: files or glob patterns: CXI/HDF5 files (frames in ``data_path``) or CBF files.
    format: ``auto`` picks by extension (``.cbf`` = CBF, anything else = CXI/HDF5).
    data_path: the frames' dataset in CXI inputs: (N, slab_ss, slab_fs) slabs or (N, P, H, W)
        stacks.
    geometry: CrystFEL ``.geom`` for CXI inputs (slab layout, radius map, bad regions);
        CBF files carry their own metrology.
    mask_file, mask_path: optional HDF5 mask (1 = good) of one frame's shape, applied on top.
    out: output folder: one ``<input stem>.peaks.cxi`` per input, plus ``findpeaks.summary.json``,
        ``findpeaks.manifest.jsonl`` (every input event: done or skipped with the reason),
        ``findpeaks.skipped.jsonl``, ``findpeaks.h5`` (all peaks, one table) and ``parts/``.
    max_frames: stop after this many frames in all, skipped ones included (None: all).
    max_nonfinite_fraction: a frame with a larger fraction of NaN/inf pixels is skipped (recorded
        with the reason); below it, NaN/inf pixels are treated as masked.

    How the run is spread and kept (the rank-partitioned engine, :mod:`peaknet.parallel`):

    backend: "auto" (MPI when launched by mpiexec/srun with several processes, else serial),
        "serial", "mpi", "ray". Every backend writes the same outputs.
    shard_size: frames per shard (one part file and record; the unit of resume).
    batch_frames: frames read and searched together (one Ray task; frames held in memory at
        once per rank).
    assignment: shards to MPI ranks "round_robin" or "block".
    resume / verify / keep_parts / stop_after_shards: see :class:`peaknet.parallel.RunOptions`
        (a re-run keeps the complete shards of the same plan; stop_after_shards interrupts a
        run on purpose).
    compression_level: gzip level of the parts and of ``findpeaks.h5``.
    progress: tqdm bar on rank 0 / the Ray driver.
    """

    inputs: list[str] = field(default_factory=list)
    format: Literal["auto", "cxi", "cbf"] = "auto"
    data_path: str = "/entry_1/data_1/data"
    geometry: Optional[pathlib.Path] = None
    mask_file: Optional[pathlib.Path] = None
    mask_path: str = "/data/data"
    out: pathlib.Path = pathlib.Path("runs/findpeaks")
    max_frames: Optional[int] = None
    max_nonfinite_fraction: float = 0.5
    backend: Literal["auto", "serial", "mpi", "ray"] = "auto"
    shard_size: int = 200
    batch_frames: int = 8
    assignment: Literal["round_robin", "block"] = "round_robin"
    resume: bool = True
    verify: Literal["digest", "size"] = "digest"
    keep_parts: bool = True
    stop_after_shards: Optional[int] = None
    compression_level: int = 4
    progress: bool = True

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: at least one input file or glob pattern is needed")
        for key in ("shard_size", "batch_frames"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.stop_after_shards is not None and self.stop_after_shards < 0:
            raise ValueError(f"stop_after_shards: must be >= 0, got {self.stop_after_shards}")
        if not 1 <= self.compression_level <= 9:
            raise ValueError(f"compression_level: must be 1..9, got {self.compression_level}")
        if self.max_frames is not None and self.max_frames < 0:
            raise ValueError(f"max_frames: must be >= 0, got {self.max_frames}")
        if not 0.0 <= self.max_nonfinite_fraction <= 1.0:
            raise ValueError(
                f"max_nonfinite_fraction: must be in [0, 1], got {self.max_nonfinite_fraction}"
            )


@dataclass
class FindPeaksRaySection:
    """``[ray]``: used with ``run.backend = "ray"``.

    address: a running Ray cluster ("127.0.0.1:6379"; "auto" finds any Ray on this machine);
        None starts a private one on 127.0.0.1 with ``num_cpus`` CPUs for the run.
    max_in_flight: frame-batch tasks in flight, capped at ``in_flight_per_cpu`` x the
        cluster's CPUs. batch_cpus: CPUs reserved by a frame-batch task (it reads its frames
        and runs peakfinder8 on each). max_retries: retries of tasks whose worker died.
    """

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    temp_dir: Optional[str] = None
    namespace: str = "peaknet"
    max_in_flight: int = 80
    in_flight_per_cpu: float = 2.0
    batch_cpus: float = 1.0
    max_retries: int = 3

    def validate(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be >= 1, got {self.max_in_flight}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus: must be >= 1, got {self.num_cpus}")
        for key in ("batch_cpus", "in_flight_per_cpu"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)}")


@dataclass
class FindPeaksConfig:
    """Config of ``peaknet findpeaks``: ``[run]``, ``[peakfinder8]`` and ``[ray]``."""

    run: FindPeaksRunSection = field(default_factory=FindPeaksRunSection)
    peakfinder8: Peakfinder8Section = field(default_factory=Peakfinder8Section)
    ray: FindPeaksRaySection = field(default_factory=FindPeaksRaySection)
