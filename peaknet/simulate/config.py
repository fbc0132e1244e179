"""Typed configuration of the ``simulate`` stage (``peaknet simulate``).

Sections (TOML tables) and what they control:

- ``[run]``       detector, frames, seed, output directory, shard size, compression;
- ``[crystal]``   unit cell / system / centering, crystal size, mosaicity, B-factor, hit fraction;
- ``[beam]``      photon energy, spectral bandwidth, divergence, polarisation, pulse jitter;
- ``[detector]``  gain (ADU per photon), readout noise, saturation, point-spread, flat field;
- ``[background]`` water ring, diffuse scattering, air scatter (photons per microsteradian);
- ``[artifacts]`` beamstop and its arm, hot / dead pixels, dead or noisy modules;
- ``[truth]``     the "detectable" criterion and the per-pixel peak mask.

The defaults describe a typical serial femtosecond crystallography (SFX) experiment: lysozyme
microcrystals (P4(3)2(1)2, 79.1 x 79.1 x 37.9 Å) of 2-6 µm in a liquid jet, 9.5 keV SASE pulses
(0.2 % bandwidth), an Epix10ka2M about 0.1 m from the sample, half the frames hits.
``THERMOLYSIN_CSPAD`` (see :func:`thermolysin_cspad_config`) is the example tuned against the
real CSPAD thermolysin frames in ``shared/data/real/thermolysin_cspad``.

Units: Å for cells and d-spacings, degrees for angles unless a name says otherwise (``_mrad``),
µm for crystal sizes, eV for photon energy, mm for beamstop dimensions, photons or ADU as named.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from .crystal import UnitCell, check_cell

__all__ = [
    "DetectorName",
    "DETECTOR_DEFAULTS",
    "RunSection",
    "CrystalSection",
    "BeamSection",
    "DetectorSection",
    "BackgroundSection",
    "ArtifactsSection",
    "TruthSection",
    "SimulateConfig",
    "thermolysin_cspad_config",
]

DetectorName = Literal["cspad", "epix10ka2m", "jungfrau4m"]
SystemName = Literal["triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic"]
CenteringName = Literal["P", "A", "B", "C", "I", "F", "R"]

#: Fallbacks used where neither the config nor the geometry file says otherwise. Gains come
#: from the geometry (``adu_per_eV`` / ``adu_per_photon``); noise and saturation are given in
#: photons so they follow the gain. CSPAD: the photon peaks of the thermolysin CBF frames are
#: ~10 ADU apart with ~2 ADU rms readout noise (measured; 0.2 photon); ePix10ka and Jungfrau
#: have ~0.1 photon rms noise at 9-12 keV; the dynamic ranges are those of the gain mode the
#: shipped geometries describe.
DETECTOR_DEFAULTS = {
    "cspad": {"adu_per_eV": 10.0 / 9742.0, "readout_noise_photons": 0.2, "max_photons": 1400.0,
              "photon_energy_eV": 9500.0, "clen_m": 0.1},
    "epix10ka2m": {"adu_per_eV": 0.0147, "readout_noise_photons": 0.1, "max_photons": 10000.0,
                   "photon_energy_eV": 9500.0, "clen_m": 0.085},
    "jungfrau4m": {"adu_per_eV": 1.0 / 12400.0, "readout_noise_photons": 0.08, "max_photons": 10000.0,
                   "photon_energy_eV": 12400.0, "clen_m": 0.12},
}


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {msg}")


def _range(values: tuple, key: str, lo: float = 0.0, strict: bool = False) -> None:
    _need(len(values) == 2, key, f"needs two values (min, max), got {len(values)}")
    a, b = values
    _need(a <= b, key, f"min {a} > max {b}")
    _need(a > lo if strict else a >= lo, key, f"values must be {'>' if strict else '>='} {lo}, got {a}")


@dataclass
class RunSection:
    """[run]: what to write and where.

    detector: shipped geometry ``peaknet/data/geometry/<detector>.geom`` (unless ``geometry``).
    frames: number of frames; frame ``i`` is generated from (seed, i) alone.
    frames_per_shard: frames per CXI file (and per truth file).
    write_frames: store the frames in the CXI files (off: peak lists + truth only).
    frame_layout: "stack" stores (N, P, H, W) frames (psana layout; peaknet reads them without a
        geometry); "slab" stores (N, SS, FS) frames as the geometry file describes them, so
        CrystFEL's indexamajig can read the shard with ``geometry.geom``. Peak lists are in slab
        coordinates either way (CrystFEL convention).
    compression: frame compression in the CXI files: "bitshuffle" (LZ4; ~10 ms per Epix frame,
        readable wherever hdf5plugin / the HDF5 bitshuffle filter is installed -- peaknet imports
        hdf5plugin; CrystFEL needs HDF5_PLUGIN_PATH), "gzip" (level 4, readable everywhere, ~20x
        slower) or "none".
    mask_compression_level: gzip level of the truth mask (1 is fast and already ~1000x).
    max_peaks: columns of the CXI peak arrays (frames with more detectable peaks are truncated).
    progress: show a tqdm progress bar.
    overwrite: rewrite shards that already exist (else shards written earlier with the same
        config are kept, so an interrupted job can simply be restarted).

    Spreading the shards (:mod:`peaknet.simulate.distributed`; the frames do not depend on it):

    backend: "auto" (MPI when mpiexec/srun started several processes, else one process),
        "serial" or "mpi": every rank writes its own shards (shard k to rank k % size), rank 0
        writes geometry, manifest and summary once all are there.
    shard_index, shard_count: this job writes the shards k with k % shard_count == shard_index
        (a Slurm array task, or any hand-made split); the job that finds every shard present
        writes geometry, manifest and summary.
    array: take shard_index / shard_count from the Slurm array task (SLURM_ARRAY_TASK_ID,
        _MIN, _STEP, _COUNT): ``sbatch --array=0-7 slurm/simulate.sbatch ...``.
    finalize_only: write no frames; check that every shard of this config is present and write
        geometry, manifest and summary (``peaknet simulate --config C --run.finalize_only=true``).
    """

    detector: DetectorName = "epix10ka2m"
    geometry: Optional[str] = None
    frames: int = 100
    seed: int = 0
    out: str = "sim"
    frames_per_shard: int = 100
    write_frames: bool = True
    frame_layout: Literal["stack", "slab"] = "stack"
    write_mask: bool = True
    compression: Literal["gzip", "bitshuffle", "none"] = "bitshuffle"
    mask_compression_level: int = 1
    max_peaks: int = 2048
    progress: bool = True
    overwrite: bool = False
    backend: Literal["auto", "serial", "mpi"] = "auto"
    shard_index: Optional[int] = None
    shard_count: Optional[int] = None
    array: bool = False
    finalize_only: bool = False

    def validate(self) -> None:
        _need(self.frames >= 0, "frames", f"must be >= 0, got {self.frames}")
        _need((self.shard_index is None) == (self.shard_count is None), "shard_index",
              "shard_index and shard_count go together")
        if self.shard_count is not None:
            _need(self.shard_count >= 1, "shard_count", f"must be >= 1, got {self.shard_count}")
            _need(0 <= self.shard_index < self.shard_count, "shard_index",
                  f"must be in 0..{self.shard_count - 1}, got {self.shard_index}")
            _need(not self.array, "array", "give either run.array or shard_index/shard_count")
        _need(self.frames_per_shard >= 1, "frames_per_shard", f"must be >= 1, got {self.frames_per_shard}")
        _need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _need(self.max_peaks >= 1, "max_peaks", f"must be >= 1, got {self.max_peaks}")
        _need(0 <= self.mask_compression_level <= 9, "mask_compression_level", "must be 0..9")
        _need(bool(str(self.out)), "out", "must name a directory")


@dataclass
class CrystalSection:
    """[crystal]: the sample.

    system, centering, cell (a, b, c in Å, alpha, beta, gamma in degrees): validated together
    (e.g. hexagonal needs a = b, gamma = 120). Only centering absences are applied.
    hit_fraction: probability that a frame holds a crystal (else: background only).
    multi_lattice_fraction: probability that a hit holds a second crystal.
    size_um: (min, max) crystal edge, drawn log-uniformly per crystal; the diffracted intensity
        scales with the volume (size³).
    photons_per_reflection: mean photons of a fully excited reflection at d -> infinity
        (before B-factor, polarisation, partiality) from a crystal of ``reference_size_um``.
        It does not follow the cell: physically a crystal of the same size with a larger cell
        has weaker reflections (mean intensity ~ 1/V_cell), so lower it when raising the cell.
    mosaicity_deg: (min, max) mosaic spread (FWHM, degrees), uniform per crystal.
    domain_size_um: mosaic block size; the reciprocal-lattice point has a radius ~ 1/size.
    b_factor: (min, max) overall Wilson B (Å²), uniform per crystal: intensity falls as
        exp(-B / (2 d²)) -- this sets how far each crystal diffracts.
    cell_jitter: relative rms per-crystal change of the cell lengths (non-isomorphism).
    profile_eta: (min, max) Lorentzian fraction of the pseudo-Voigt spot profile, per crystal.
    profile_extra_px: (min, max) rms (pixels) of an extra elliptical spot term per crystal
        (crystal shape, beam footprint, unresolved splitting); each spot gets a random
        orientation and an axis ratio 1 + |N(0, profile_ellipticity)|.
    profile_scale_jitter: relative rms per-crystal scale of all spot widths.
    d_min: reflections with d < d_min (Å) are not generated at all (a compute cut-off; keep it
        below what the B-factors let through).
    structure_seed: seeds the Wilson-distributed structure-factor intensities |F(hkl)|², so the
        same protein gives the same relative intensities in every run.
    """

    system: SystemName = "tetragonal"
    centering: CenteringName = "P"
    cell: tuple[float, ...] = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
    hit_fraction: float = 0.5
    multi_lattice_fraction: float = 0.05
    size_um: tuple[float, ...] = (2.0, 6.0)
    reference_size_um: float = 3.5
    photons_per_reflection: float = 1500.0
    mosaicity_deg: tuple[float, ...] = (0.03, 0.15)
    domain_size_um: float = 0.3
    b_factor: tuple[float, ...] = (15.0, 45.0)
    cell_jitter: float = 0.002
    profile_eta: tuple[float, ...] = (0.0, 0.25)
    profile_extra_px: tuple[float, ...] = (0.0, 0.3)
    profile_ellipticity: float = 0.25
    profile_scale_jitter: float = 0.15
    d_min: float = 1.4
    structure_seed: int = 1

    def unit_cell(self) -> UnitCell:
        return UnitCell.from_sequence(self.cell)

    def validate(self) -> None:
        _need(len(self.cell) in (3, 6), "cell", f"needs 6 values (a, b, c, alpha, beta, gamma), got {len(self.cell)}")
        try:
            cell = self.unit_cell()
            check_cell(cell, self.system, self.centering)
        except ValueError as exc:
            raise ValueError(f"cell: {exc}") from None
        _need(0.0 <= self.hit_fraction <= 1.0, "hit_fraction", f"must be in [0, 1], got {self.hit_fraction}")
        _need(0.0 <= self.multi_lattice_fraction <= 1.0, "multi_lattice_fraction", "must be in [0, 1]")
        _range(self.size_um, "size_um", strict=True)
        _need(self.reference_size_um > 0, "reference_size_um", "must be > 0")
        _need(self.photons_per_reflection >= 0, "photons_per_reflection", "must be >= 0")
        _range(self.mosaicity_deg, "mosaicity_deg")
        _need(self.domain_size_um > 0, "domain_size_um", "must be > 0")
        _range(self.b_factor, "b_factor")
        _need(0 <= self.cell_jitter < 0.1, "cell_jitter", "must be in [0, 0.1)")
        _range(self.profile_eta, "profile_eta")
        _need(self.profile_eta[1] <= 1, "profile_eta", "must be in [0, 1]")
        _range(self.profile_extra_px, "profile_extra_px")
        _need(0 <= self.profile_ellipticity < 2, "profile_ellipticity", "must be in [0, 2)")
        _need(0 <= self.profile_scale_jitter < 1, "profile_scale_jitter", "must be in [0, 1)")
        _need(self.d_min > 0, "d_min", f"must be > 0 Å, got {self.d_min}")
        # guard against reflection lists that would not fit in memory
        n_est = 4.0 / 3.0 * math.pi / self.d_min**3 * cell.volume
        _need(
            n_est < 2.5e7,
            "d_min",
            f"{self.d_min} Å with a {cell.volume:.3g} Å³ cell gives ~{n_est:.3g} reflections; raise d_min",
        )


@dataclass
class BeamSection:
    """[beam]: the X-ray pulses.

    photon_energy_eV: None -> the geometry file's photon_energy, else 9500 eV.
    energy_jitter: relative rms shot-to-shot jitter of the central photon energy.
    bandwidth: relative FWHM of the spectrum (SASE: ~0.002); widens the Ewald shell
        (more, more partial reflections) and streaks spots radially.
    divergence_mrad: beam divergence (FWHM, mrad).
    polarisation: fraction of the beam polarised along the lab x axis (XFELs: ~1).
    pulse_jitter: relative rms of the pulse fluence (gamma distributed).
    """

    photon_energy_eV: Optional[float] = None
    energy_jitter: float = 1e-3
    bandwidth: float = 2e-3
    divergence_mrad: float = 0.05
    polarisation: float = 1.0
    pulse_jitter: float = 0.15

    def validate(self) -> None:
        if self.photon_energy_eV is not None:
            _need(1000.0 <= self.photon_energy_eV <= 50000.0, "photon_energy_eV", "must be in 1000..50000 eV")
        _need(0 <= self.energy_jitter < 0.05, "energy_jitter", "must be in [0, 0.05)")
        _need(0 <= self.bandwidth < 0.2, "bandwidth", "must be in [0, 0.2)")
        _need(0 <= self.divergence_mrad < 50, "divergence_mrad", "must be in [0, 50)")
        _need(0 <= self.polarisation <= 1, "polarisation", "must be in [0, 1]")
        _need(0 <= self.pulse_jitter < 2, "pulse_jitter", "must be in [0, 2)")


@dataclass
class DetectorSection:
    """[detector]: where the detector is and how photons become ADU.

    clen_m: sample-detector distance in metres; None -> the geometry's clen when it is a number,
        else the detector's default (``DETECTOR_DEFAULTS``).

    adu_per_photon: None -> the geometry's adu_per_photon / adu_per_eV x photon energy, else the
        detector's default (``DETECTOR_DEFAULTS``).
    readout_noise_adu: rms Gaussian noise; None -> the detector's default (in photons) x gain.
    max_adu: saturation; None -> the geometry's max_adu, else the default (photons) x gain.
    psf_sigma_px: charge sharing / point-spread (Gaussian sigma, pixels) added to every spot.
    flat_field: relative rms pixel-to-pixel gain variation (fixed per run).
    adu_step: values are rounded to multiples of this (real detectors give integer ADU);
        None -> 1 ADU when adu_per_photon >= 5, else no rounding; 0 -> no rounding.
    common_mode_photons: rms per-module offset (pedestal / common-mode residual) per frame, in
        photons; offset_photons: their mean (real corrected data are often biased by a
        fraction of a photon).
    """

    clen_m: Optional[float] = None
    adu_per_photon: Optional[float] = None
    readout_noise_adu: Optional[float] = None
    max_adu: Optional[float] = None
    psf_sigma_px: float = 0.25
    flat_field: float = 0.02
    adu_step: Optional[float] = None
    common_mode_photons: float = 0.05
    offset_photons: float = 0.0

    def validate(self) -> None:
        if self.clen_m is not None:
            _need(0.01 <= self.clen_m <= 10.0, "clen_m", f"must be in 0.01..10 m, got {self.clen_m}")
        if self.adu_per_photon is not None:
            _need(self.adu_per_photon > 0, "adu_per_photon", "must be > 0")
        if self.readout_noise_adu is not None:
            _need(self.readout_noise_adu >= 0, "readout_noise_adu", "must be >= 0")
        if self.max_adu is not None:
            _need(self.max_adu > 0, "max_adu", "must be > 0")
        _need(0 <= self.psf_sigma_px <= 5, "psf_sigma_px", "must be in [0, 5] pixels")
        _need(0 <= self.flat_field < 0.5, "flat_field", "must be in [0, 0.5)")
        if self.adu_step is not None:
            _need(self.adu_step >= 0, "adu_step", "must be >= 0")
        _need(self.common_mode_photons >= 0, "common_mode_photons", "must be >= 0")
        _need(abs(self.offset_photons) <= 10, "offset_photons", "must be within +-10 photons")


@dataclass
class BackgroundSection:
    """[background]: diffuse scattering, in photons per microsteradian (µsr) at its maximum.

    Every term is multiplied by the pixel's solid angle and the polarisation factor.
    water_ring: liquid (jet) scattering, peak at 1/d = 1/water_ring_d (d in Å), Gaussian in 1/d
        of rms ``water_ring_width`` (1/Å), plus a second, weaker hump at ~1/2.1 Å.
    diffuse: amorphous / protein / Compton scattering falling as exp(-(1/d)²/(2·diffuse_width²)).
    air: air and window scatter, falling with 2θ as 1 / (1 + (2θ/0.04 rad)²).
    jitter: relative rms of the per-frame background level (jet thickness, pulse energy).
    hit_extra: extra diffuse scattering of a hit, relative to ``diffuse`` (the crystal's own).
    """

    water_ring: float = 3.5
    water_ring_d: float = 3.2
    water_ring_width: float = 0.08
    diffuse: float = 0.8
    diffuse_width: float = 0.25
    air: float = 0.2
    jitter: float = 0.25
    hit_extra: float = 0.2

    def validate(self) -> None:
        for k in ("water_ring", "diffuse", "air", "hit_extra"):
            _need(getattr(self, k) >= 0, k, "must be >= 0")
        _need(self.water_ring_d > 0, "water_ring_d", "must be > 0 Å")
        _need(self.water_ring_width > 0, "water_ring_width", "must be > 0 1/Å")
        _need(self.diffuse_width > 0, "diffuse_width", "must be > 0 1/Å")
        _need(0 <= self.jitter < 2, "jitter", "must be in [0, 2)")


@dataclass
class ArtifactsSection:
    """[artifacts]: what real detectors add.

    beamstop_radius_mm: radius of the beamstop's shadow at the nominal detector distance (0: no
        beamstop); beamstop_transmission: fraction passing through it; beamstop_arm_width_mm /
        beamstop_arm_angle_deg: the holding arm (shadow from the beamstop to the detector edge,
        angle measured from the lab +x axis; width 0: no arm).
    hot_pixel_fraction: fixed hot pixels (per run), reading ``hot_pixel_photons`` (min, max).
    dead_pixel_fraction: fixed dead pixels (per run) reading 0 ADU.
    dead_module_prob / noisy_module_prob: per frame, probability that one module reads zeros /
        has ``noisy_module_factor`` x the readout noise and a random offset.
    saturate: clip at max_adu.
    """

    beamstop_radius_mm: float = 2.5
    beamstop_transmission: float = 0.002
    beamstop_arm_width_mm: float = 1.2
    beamstop_arm_angle_deg: float = 235.0
    hot_pixel_fraction: float = 5e-5
    hot_pixel_photons: tuple[float, ...] = (5.0, 200.0)
    dead_pixel_fraction: float = 2e-4
    dead_module_prob: float = 0.01
    noisy_module_prob: float = 0.01
    noisy_module_factor: float = 10.0
    saturate: bool = True

    def validate(self) -> None:
        _need(self.beamstop_radius_mm >= 0, "beamstop_radius_mm", "must be >= 0")
        _need(0 <= self.beamstop_transmission <= 1, "beamstop_transmission", "must be in [0, 1]")
        _need(self.beamstop_arm_width_mm >= 0, "beamstop_arm_width_mm", "must be >= 0")
        for k in ("hot_pixel_fraction", "dead_pixel_fraction", "dead_module_prob", "noisy_module_prob"):
            _need(0 <= getattr(self, k) <= 1, k, "must be in [0, 1]")
        _range(self.hot_pixel_photons, "hot_pixel_photons")
        _need(self.noisy_module_factor >= 1, "noisy_module_factor", "must be >= 1")


@dataclass
class TruthSection:
    """[truth]: what counts as a peak.

    min_partiality: reflections with partiality below this are not predicted at all.
    snr_threshold: a reflection is *detectable* if the integrated expected signal S over its
        spot area (pixels where its profile >= ``area_fraction`` of the profile maximum, at
        least one pixel) satisfies ``S / sqrt(S + B + n·σ²) >= snr_threshold`` with B the
        expected background photons and n the pixels of that area, σ the readout noise in
        photons; its peak pixel must also be a working pixel (not dead, hot, shadowed below
        ``beamstop_transmission`` or on a dead module).
    area_fraction: profile level (relative to its maximum) that delimits the spot area.
    mask_fraction, mask_snr: a pixel belongs to the peak mask if it is in the spot of a
        detectable reflection, its expected spot photons s >= ``mask_fraction`` x the spot's
        brightest pixel, and s >= ``mask_snr`` x sqrt(b + σ²) (b: its background photons);
        the brightest pixel of every detectable spot is always in the mask.
    min_photons: reflections with fewer expected photons are dropped from the truth table.
    """

    min_partiality: float = 0.01
    snr_threshold: float = 5.0
    area_fraction: float = 0.2
    mask_fraction: float = 0.25
    mask_snr: float = 1.0
    min_photons: float = 0.5

    def validate(self) -> None:
        _need(0 < self.min_partiality < 1, "min_partiality", "must be in (0, 1)")
        _need(self.snr_threshold > 0, "snr_threshold", "must be > 0")
        _need(0 < self.area_fraction < 1, "area_fraction", "must be in (0, 1)")
        _need(0 < self.mask_fraction <= 1, "mask_fraction", "must be in (0, 1]")
        _need(self.mask_snr >= 0, "mask_snr", "must be >= 0")
        _need(self.min_photons >= 0, "min_photons", "must be >= 0")


@dataclass
class SimulateConfig:
    """The ``simulate`` stage config (``peaknet simulate``); see the module docstring."""

    run: RunSection = field(default_factory=RunSection)
    crystal: CrystalSection = field(default_factory=CrystalSection)
    beam: BeamSection = field(default_factory=BeamSection)
    detector: DetectorSection = field(default_factory=DetectorSection)
    background: BackgroundSection = field(default_factory=BackgroundSection)
    artifacts: ArtifactsSection = field(default_factory=ArtifactsSection)
    truth: TruthSection = field(default_factory=TruthSection)

    def validate(self) -> None:
        """Validate every section (the loader does this too; direct users call it)."""
        for name in ("run", "crystal", "beam", "detector", "background", "artifacts", "truth"):
            getattr(self, name).validate()


def thermolysin_cspad_config(**run) -> SimulateConfig:
    """The thermolysin / CSPAD example (LCLS cxi78513): P6(1)22, a = b = 93.0, c = 130.4 Å,
    1.2726 Å (9742 eV), 130.1 mm, tuned so that background level, spot widths and spot counts
    are comparable with the four real CBF frames. ``run`` overrides [run] fields.

    Measured with the estimators of :mod:`peaknet.simulate.realism` (real: 4 CBF frames and the
    244 DIALS-indexed spots; simulated: 8 frames, the 81 strongest detectable spots per frame):
    photon peaks of the real data 10 ADU apart, readout noise ~2 ADU rms; median background
    (ADU) at 1/d = 0.03, 0.15, 0.27, 0.39, 0.51 1/Å: real 5, 10.5, 31, 15.5, 6 -- simulated 5, 12,
    30, 13.5, 6; bright spots (>= 2 px above median + 8 MAD) per frame: real 322-410 (median
    381), simulated 199-641 (median 312); spot width sqrt(σ_ss σ_fs) from second moments: real
    0.90 px, simulated 0.94 px; brightest pixel 739 vs 1007 ADU; integrated 1872 vs 3300 ADU.
    """
    cfg = SimulateConfig()
    cfg.run = RunSection(detector="cspad", **run)
    cfg.crystal = CrystalSection(
        system="hexagonal",
        centering="P",
        cell=(93.0, 93.0, 130.4, 90.0, 90.0, 120.0),
        hit_fraction=1.0,
        multi_lattice_fraction=0.0,
        size_um=(4.5, 6.5),
        reference_size_um=5.0,
        photons_per_reflection=270.0,
        mosaicity_deg=(0.05, 0.15),
        domain_size_um=0.3,
        b_factor=(10.0, 20.0),
        profile_eta=(0.0, 0.2),
        profile_extra_px=(0.0, 0.25),
        d_min=1.6,
    )
    cfg.beam = BeamSection(photon_energy_eV=12398.42 / 1.2726, bandwidth=2e-3, divergence_mrad=0.05)
    cfg.detector = DetectorSection(
        clen_m=0.1301, adu_per_photon=10.0, readout_noise_adu=2.0, max_adu=14000.0, psf_sigma_px=0.2,
        offset_photons=0.2,
    )
    cfg.background = BackgroundSection(
        water_ring=5.4, water_ring_d=3.45, water_ring_width=0.08, diffuse=0.78, diffuse_width=0.2, air=0.05
    )
    return cfg
