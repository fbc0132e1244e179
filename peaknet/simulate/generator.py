"""The frame generator: deterministic synthetic SFX frames with their ground truth.

``iter_frames(cfg, start, stop)`` yields ``(frame, truth)`` pairs: ``frame`` a (P, H, W) float32
stack in ADU, ``truth`` a :class:`FrameTruth`. Frame ``i`` depends only on ``(cfg, i)``: its
random numbers come from ``SeedSequence(cfg.run.seed, spawn_key=(0, i))`` (crystal, beam,
artifacts) and a counter-based generator keyed from it (pixel noise); the fixed per-run
detector defects (dead / hot pixels, flat field) from ``spawn_key=(1,)``. So any frame can be
regenerated alone, shards are independent, and MPI ranks can split frames in any way.

What one frame holds
--------------------
With probability ``crystal.hit_fraction`` a frame is a hit: one crystal (two with
``multi_lattice_fraction``), each with a uniformly random orientation (SO(3)), a size (log-
uniform), mosaicity and B-factor (uniform in their ranges), a pseudo-Voigt profile fraction
and a slightly elliptical spot shape. Every frame has background (water ring, diffuse, air
scatter; the level jitters from frame to frame and a hit adds its own diffuse scattering),
beamstop shadow, per-module offsets, readout noise, Poisson photon noise, fixed dead and hot
pixels and, now and then, a dead or noisy module.

Spot widths on the detector (rms, angles in radians, mapped to pixels with the projection's
local Jacobian): radial ``sqrt(σ_div² + (2 tanθ σ_bw,eff)² + (ρ/k)²)``, tangential
``sqrt(σ_div² + (2 sinθ σ_mos)² + (ρ/k)²)``, plus the detector point-spread and a per-crystal
elliptical term; ``σ_bw,eff = σ_bw · min(1, R / w)`` is the part of the spectrum a
reciprocal-lattice point of radius ``R = ρ + |q| σ_mos`` actually samples across an Ewald
shell of thickness ``w = λ|q|² σ_bw / 2``.

The CLI calls :func:`run` (``peaknet simulate``), which writes shards; see
:mod:`peaknet.simulate.writer`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from peaknet.errors import GeometryError
from peaknet.peaks import PeakList

from .config import DETECTOR_DEFAULTS, SimulateConfig
from .crystal import enumerate_hkl, random_rotation
from .detector import (
    StaticMaps,
    build_static_maps,
    NORMAL_TABLE,
    counts_to_adu,
    render_spots,
    spot_covariances,
)
from .diffraction import FWHM_TO_SIGMA, HC_EV_A, predict_still, wilson_intensities

__all__ = ["FrameTruth", "Simulator", "iter_frames", "load_geometry", "run", "REFLECTION_COLUMNS"]

#: Columns of a frame's reflection table (``FrameTruth.reflections``) with their dtypes.
REFLECTION_COLUMNS = {
    "lattice": np.int8,  # crystal index in the frame (0, or 1 for a second lattice)
    "h": np.int32,
    "k": np.int32,
    "l": np.int32,
    "panel": np.int32,  # module index
    "ss": np.float32,  # module-local slow-scan pixel coordinate, pixel centre at integers
    "fs": np.float32,  # module-local fast-scan pixel coordinate
    "d": np.float32,  # resolution, Å
    "partiality": np.float32,  # exp(-ε²/2σ_ε²) in [0, 1]
    "excitation_error": np.float32,  # ε, 1/Å
    "photons": np.float32,  # expected integrated photons of the spot (before beamstop shadow)
    "peak_photons": np.float32,  # expected photons in the brightest pixel (after shadow)
    "background": np.float32,  # expected background photons summed over the spot area
    "npix_area": np.int16,  # pixels of the spot area (profile >= area_fraction of max)
    "snr": np.float32,  # S / sqrt(S + B + n σ²) over the spot area
    "detectable": np.bool_,  # snr >= truth.snr_threshold on a working pixel
    "npix_mask": np.int16,  # pixels this spot contributes to the peak mask
    "cov_ss": np.float32,  # profile covariance (pixels²)
    "cov_sf": np.float32,
    "cov_ff": np.float32,
    "eta": np.float32,  # pseudo-Voigt Lorentzian fraction
}


@dataclass
class FrameTruth:
    """Ground truth of one frame.

    index: global frame index; event_id: "sim/<seed>/<index>"; hit: crystal in the beam;
    photon_energy_eV, wavelength_A: this pulse; adu_per_photon: gain used;
    reflections: dict of columns (see ``REFLECTION_COLUMNS``), one row per predicted
    reflection that hits a module (partiality >= min_partiality, photons >= min_photons);
    mask: (P, H, W) bool per-pixel peak mask; orientations: (L, 3, 3) U matrices of the L
    crystals (q_lab = U B h); cells: (L, 6) their (jittered) cells; scalars: per-frame values
    (crystal sizes, B-factors, background scales, dead / noisy module, ...).
    """

    index: int
    event_id: str
    hit: bool
    photon_energy_eV: float
    wavelength_A: float
    adu_per_photon: float
    reflections: dict
    mask: np.ndarray
    orientations: np.ndarray
    cells: np.ndarray
    scalars: dict = field(default_factory=dict)

    @property
    def n_reflections(self) -> int:
        return int(self.reflections["h"].size)

    @property
    def detectable(self) -> np.ndarray:
        return self.reflections["detectable"]

    @property
    def n_detectable(self) -> int:
        return int(np.count_nonzero(self.reflections["detectable"]))

    def peaks(self, detectable_only: bool = True) -> PeakList:
        """The truth as a :class:`PeakList` (ADU): intensity = expected photons x gain,
        max_value = expected peak-pixel photons x gain, snr, npix = mask pixels."""
        r = self.reflections
        sel = r["detectable"] if detectable_only else np.ones(r["h"].size, bool)
        g = self.adu_per_photon
        return PeakList.from_columns(
            int(sel.sum()),
            panel=r["panel"][sel],
            ss=r["ss"][sel],
            fs=r["fs"][sel],
            intensity=r["photons"][sel] * g,
            max_value=r["peak_photons"][sel] * g,
            snr=r["snr"][sel],
            npix=r["npix_mask"][sel],
        )


def load_geometry(cfg: SimulateConfig):
    """The geometry of ``cfg.run`` (file or shipped detector)."""
    from peaknet.io import geometry as g

    if cfg.run.geometry:
        return g.parse_geometry(cfg.run.geometry)
    return g.load_builtin_geometry(cfg.run.detector)


def _empty_reflections() -> dict:
    return {k: np.zeros(0, dt) for k, dt in REFLECTION_COLUMNS.items()}


class Simulator:
    """Holds everything fixed for a run (geometry, reflection list, static maps) and makes
    frames on demand: ``sim.frame(i) -> (frame, truth)``.

    geometry: a :class:`peaknet.io.geometry.Geometry` to use instead of ``cfg.run``'s.
    """

    def __init__(self, cfg: SimulateConfig, geometry=None):
        cfg.validate()
        self.cfg = cfg
        geom = geometry if geometry is not None else load_geometry(cfg)
        det = cfg.run.detector
        defaults = DETECTOR_DEFAULTS.get(det, DETECTOR_DEFAULTS["epix10ka2m"])
        # photon energy: config > geometry > default
        energy = cfg.beam.photon_energy_eV or geom.photon_energy_eV or defaults["photon_energy_eV"]
        self.photon_energy_eV = float(energy)
        self.wavelength_A = HC_EV_A / self.photon_energy_eV
        # camera length: config > geometry > default
        clen = cfg.detector.clen_m if cfg.detector.clen_m is not None else None
        if clen is None:
            try:
                gc = geom.clen
            except GeometryError:
                gc = None
            clen = gc if isinstance(gc, float) else defaults.get("clen_m", 0.1)
        self.clen_m = float(clen)
        self.geom = geom.with_values(clen=self.clen_m, photon_energy_eV=self.photon_energy_eV)
        self.stack_shape = tuple(self.geom.stack_shape)
        # gain: config > geometry (adu_per_photon, adu_per_eV) > default
        self.adu_per_photon = float(self._gain(geom, defaults))
        rn = cfg.detector.readout_noise_adu
        self.read_noise_adu = float(rn if rn is not None else defaults["readout_noise_photons"] * self.adu_per_photon)
        max_adu = cfg.detector.max_adu
        if max_adu is None:
            vals = {p.max_adu for p in geom.panels if p.max_adu is not None}
            max_adu = min(vals) if vals else defaults["max_photons"] * self.adu_per_photon
        self.max_adu = float(max_adu)
        step = cfg.detector.adu_step
        self.adu_step = float(step if step is not None else (1.0 if self.adu_per_photon >= 5.0 else 0.0))

        static_rng = np.random.default_rng(np.random.SeedSequence(cfg.run.seed, spawn_key=(1,)))
        a = cfg.artifacts
        self.maps: StaticMaps = build_static_maps(
            self.geom,
            self.wavelength_A,
            self.clen_m,
            polarisation=cfg.beam.polarisation,
            water_ring_d=cfg.background.water_ring_d,
            water_ring_width=cfg.background.water_ring_width,
            diffuse_width=cfg.background.diffuse_width,
            beamstop_radius_mm=a.beamstop_radius_mm,
            beamstop_transmission=a.beamstop_transmission,
            beamstop_arm_width_mm=a.beamstop_arm_width_mm,
            beamstop_arm_angle_deg=a.beamstop_arm_angle_deg,
            flat_field=cfg.detector.flat_field,
            hot_pixel_fraction=a.hot_pixel_fraction,
            hot_pixel_photons=a.hot_pixel_photons,
            dead_pixel_fraction=a.dead_pixel_fraction,
            rng=static_rng,
        )
        # reflections: everything up to the detector's corner (shortest wavelength of the run)
        c = cfg.crystal
        self.cell = c.unit_cell()
        s_max = float(self.maps.s[self.maps.good].max()) if self.maps.good.any() else 1.0
        lam_min = self.wavelength_A * (1.0 - 5.0 * cfg.beam.energy_jitter - 2.0 * cfg.beam.bandwidth)
        s_max *= self.wavelength_A / lam_min
        d_enum = max(c.d_min, 1.0 / s_max) * (1.0 - 5.0 * c.cell_jitter)
        self.d_min_enumerated = d_enum
        self.hkl = enumerate_hkl(self.cell, d_enum, c.centering)
        self.jhkl = wilson_intensities(self.hkl, c.structure_seed)
        self._B = self.cell.reciprocal_basis()
        self._f32 = np.float32

    # ------------------------------------------------------------------------------------
    def _gain(self, geom, defaults) -> float:
        if self.cfg.detector.adu_per_photon is not None:
            return self.cfg.detector.adu_per_photon
        app = {p.adu_per_photon for p in geom.panels if p.adu_per_photon is not None}
        if app:
            return float(np.median(sorted(app)))
        ape = {p.adu_per_eV for p in geom.panels if p.adu_per_eV is not None}
        if ape:
            return float(np.median(sorted(ape))) * self.photon_energy_eV
        return defaults["adu_per_eV"] * self.photon_energy_eV

    def frame_rng(self, index: int) -> np.random.Generator:
        """The generator of frame ``index`` (depends only on the seed and the index)."""
        return np.random.default_rng(np.random.SeedSequence(self.cfg.run.seed, spawn_key=(0, int(index))))

    def event_id(self, index: int) -> str:
        return f"sim/{self.cfg.run.seed}/{int(index)}"

    # ------------------------------------------------------------------------------------
    def _lattice(self, rng, wavelength, pulse):
        """Predict one crystal's reflections; returns (columns dict, U, cell, scalars)."""
        c = self.cfg.crystal
        b = self.cfg.beam
        U = random_rotation(rng)
        f = 1.0 + c.cell_jitter * rng.standard_normal()
        B = self._B / f
        lo, hi = c.size_um
        size = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        mos_deg = rng.uniform(*c.mosaicity_deg)
        bfac = rng.uniform(*c.b_factor)
        scale = c.photons_per_reflection * (size / c.reference_size_um) ** 3 * pulse
        mos = math.radians(mos_deg) * FWHM_TO_SIGMA
        div = b.divergence_mrad * 1e-3 * FWHM_TO_SIGMA
        bw = b.bandwidth * FWHM_TO_SIGMA
        rho = 1.0 / (2.0 * c.domain_size_um * 1e4)  # 1/Å
        pred = predict_still(
            self.hkl, self.jhkl, B, U, wavelength,
            mosaicity_rad_sigma=mos, divergence_rad_sigma=div, bandwidth_sigma=bw,
            rlp_radius=rho, b_factor=bfac, scale=scale, polarisation=b.polarisation,
            min_partiality=self.cfg.truth.min_partiality,
        )
        keep = (pred.photons >= self.cfg.truth.min_photons) & (pred.two_theta < math.radians(85.0))
        pred = pred.take(keep)
        panel, ss, fs, valid = self.geom.project(pred.directions, clen=self.clen_m)
        pred = pred.take(valid)
        panel, ss, fs = panel[valid], ss[valid], fs[valid]
        n = len(pred)
        # angular widths
        k = 1.0 / wavelength
        theta = 0.5 * pred.two_theta
        qn = 1.0 / pred.d
        R = rho + qn * mos
        w = 0.5 * wavelength * qn * qn * bw
        bw_eff = bw * np.minimum(1.0, R / np.maximum(w, 1e-12))
        sig_r = np.sqrt(div**2 + (2.0 * np.tan(theta) * bw_eff) ** 2 + (rho / k) ** 2)
        sig_t = np.sqrt(div**2 + (2.0 * np.sin(theta) * mos) ** 2 + (rho / k) ** 2)
        # per-crystal shape: overall scale, ellipticity with random orientation per spot
        prof_scale = math.exp(c.profile_scale_jitter * rng.standard_normal())
        ell_sigma = rng.uniform(*c.profile_extra_px)  # px
        phi = rng.uniform(0.0, math.pi, n)
        ratio = 1.0 + np.abs(rng.normal(0.0, c.profile_ellipticity, n))
        extra = np.zeros((n, 2, 2))
        ca, sa = np.cos(phi), np.sin(phi)
        l1, l2 = (ell_sigma * ratio) ** 2, (ell_sigma / ratio) ** 2
        extra[:, 0, 0] = l1 * ca * ca + l2 * sa * sa
        extra[:, 1, 1] = l1 * sa * sa + l2 * ca * ca
        extra[:, 0, 1] = extra[:, 1, 0] = (l1 - l2) * ca * sa
        cov = spot_covariances(
            self.geom, self.clen_m, pred.directions, panel, ss, fs, sig_r, sig_t, self.cfg.detector.psf_sigma_px, extra
        ) * prof_scale**2
        eta = rng.uniform(*c.profile_eta)
        cols = {
            "h": pred.hkl[:, 0],
            "k": pred.hkl[:, 1],
            "l": pred.hkl[:, 2],
            "panel": panel,
            "ss": ss,
            "fs": fs,
            "d": pred.d,
            "partiality": pred.partiality,
            "excitation_error": pred.excitation,
            "photons": pred.photons,
            "cov_ss": cov[:, 0, 0],
            "cov_sf": cov[:, 0, 1],
            "cov_ff": cov[:, 1, 1],
            "eta": np.full(n, eta),
        }
        cell = np.array([self.cell.a * f, self.cell.b * f, self.cell.c * f, self.cell.alpha, self.cell.beta, self.cell.gamma])
        scal = {"size_um": size, "mosaicity_deg": mos_deg, "b_factor": bfac, "scale_photons": scale}
        return cols, U, cell, scal

    # ------------------------------------------------------------------------------------
    def frame(self, index: int) -> tuple[np.ndarray, FrameTruth]:
        """Frame ``index``: (P, H, W) float32 ADU and its :class:`FrameTruth`."""
        cfg = self.cfg
        rng = self.frame_rng(index)
        key = np.uint64(rng.integers(0, 2**63, dtype=np.int64))
        b = cfg.beam
        energy = self.photon_energy_eV * (1.0 + b.energy_jitter * rng.standard_normal())
        wavelength = HC_EV_A / energy
        if b.pulse_jitter > 0:
            shape_k = 1.0 / b.pulse_jitter**2
            pulse = rng.gamma(shape_k, 1.0 / shape_k)
        else:
            pulse = 1.0
        hit = bool(rng.random() < cfg.crystal.hit_fraction)
        n_lat = 0
        if hit:
            n_lat = 2 if rng.random() < cfg.crystal.multi_lattice_fraction else 1
        P, H, W = self.stack_shape
        # per-frame artifacts (drawn before the crystals so blank and hit frames share them)
        a = cfg.artifacts
        alive = np.ones(P, np.bool_)
        read_sigma = np.full(P, self.read_noise_adu)
        offset = rng.normal(cfg.detector.offset_photons, cfg.detector.common_mode_photons, P) * self.adu_per_photon
        dead_module = -1
        noisy_module = -1
        if rng.random() < a.dead_module_prob:
            dead_module = int(rng.integers(P))
            alive[dead_module] = False
        if rng.random() < a.noisy_module_prob:
            noisy_module = int(rng.integers(P))
            read_sigma[noisy_module] *= a.noisy_module_factor
            offset[noisy_module] += rng.normal(0.0, 2.0 * self.adu_per_photon)
        hot_values = rng.poisson(self.maps.hot_level).astype(np.float64)
        bg = cfg.background
        jit = math.exp(bg.jitter * rng.standard_normal() - 0.5 * bg.jitter**2)
        w_sc = bg.water_ring * jit * pulse
        d_sc = bg.diffuse * (1.0 + (bg.hit_extra if hit else 0.0)) * jit * pulse
        a_sc = bg.air * pulse

        lat_cols, Us, cells, lat_scal = [], [], [], []
        for li in range(n_lat):
            cols, U, cell, scal = self._lattice(rng, wavelength, pulse)
            cols["lattice"] = np.full(cols["h"].size, li)
            lat_cols.append(cols)
            Us.append(U)
            cells.append(cell)
            lat_scal.append(scal)

        spot_map = np.zeros((P, H, W), np.float32)
        mask = np.zeros((P, H, W), np.bool_)
        if lat_cols:
            refl = {k: np.concatenate([c[k] for c in lat_cols]) for k in lat_cols[0]}
        else:
            refl = _empty_reflections()
        n = refl["h"].size
        read_var_ph = (read_sigma / self.adu_per_photon) ** 2
        m = self.maps
        t = cfg.truth
        if n:
            cov = np.empty((n, 2, 2))
            cov[:, 0, 0] = refl["cov_ss"]
            cov[:, 0, 1] = cov[:, 1, 0] = refl["cov_sf"]
            cov[:, 1, 1] = refl["cov_ff"]
            peak, sig, bsum, narea, snr, det, nmask = render_spots(
                refl["panel"].astype(np.int64), refl["ss"].astype(np.float64), refl["fs"].astype(np.float64),
                cov, refl["eta"].astype(np.float64), refl["photons"].astype(np.float64),
                m.bw, m.bd, m.ba, m.transmission, m.good, alive,
                w_sc, d_sc, a_sc, read_var_ph,
                t.area_fraction, t.snr_threshold, t.mask_fraction, t.mask_snr,
                max(a.beamstop_transmission * 1.01, 0.5),
                spot_map, mask,
            )
        else:
            peak = sig = bsum = snr = np.zeros(0)
            narea = nmask = np.zeros(0, np.int32)
            det = np.zeros(0, np.bool_)
        refl["peak_photons"] = peak
        refl["background"] = bsum
        refl["npix_area"] = narea
        refl["snr"] = snr
        refl["detectable"] = det
        refl["npix_mask"] = nmask
        refl = {k: np.ascontiguousarray(refl[k], dtype=dt) for k, dt in REFLECTION_COLUMNS.items()}

        out = np.empty((P, H, W), np.float32)
        counts_to_adu(
            spot_map, m.bw, m.bd, m.ba, m.gain, alive,
            w_sc, d_sc, a_sc, self.adu_per_photon, read_sigma, offset, self.max_adu,
            bool(a.saturate), self.adu_step, key, NORMAL_TABLE, out,
        )
        if m.hot_index.size:
            flat = out.reshape(-1)
            hv = flat[m.hot_index] + hot_values * self.adu_per_photon
            if a.saturate:
                hv = np.minimum(hv, self.max_adu)
            if self.adu_step > 0:
                hv = np.floor(hv / self.adu_step + 0.5) * self.adu_step
            alive_hot = alive[m.hot_index // (H * W)]
            flat[m.hot_index] = np.where(alive_hot, hv, 0.0)

        scalars = {
            "pulse": pulse,
            "background_water": w_sc,
            "background_diffuse": d_sc,
            "background_air": a_sc,
            "dead_module": dead_module,
            "noisy_module": noisy_module,
            "n_lattices": n_lat,
        }
        for li, s in enumerate(lat_scal):
            for k2, v in s.items():
                scalars[f"{k2}_{li}"] = v
        truth = FrameTruth(
            index=int(index),
            event_id=self.event_id(index),
            hit=hit,
            photon_energy_eV=float(energy),
            wavelength_A=float(wavelength),
            adu_per_photon=self.adu_per_photon,
            reflections=refl,
            mask=mask,
            orientations=np.array(Us).reshape(-1, 3, 3),
            cells=np.array(cells).reshape(-1, 6),
            scalars=scalars,
        )
        return out, truth

    def iter_frames(self, start: int = 0, stop: Optional[int] = None) -> Iterator[tuple[np.ndarray, FrameTruth]]:
        stop = self.cfg.run.frames if stop is None else stop
        for i in range(int(start), int(stop)):
            yield self.frame(i)


def iter_frames(
    cfg: SimulateConfig, start: int = 0, stop: Optional[int] = None, geometry=None
) -> Iterator[tuple[np.ndarray, FrameTruth]]:
    """Yield ``(frame, truth)`` for frames ``start .. stop-1`` (default: ``cfg.run.frames``).

    frame: (P, H, W) float32 ADU; truth: :class:`FrameTruth`. Memory stays bounded (one frame
    at a time); frame i is identical whatever ``start`` is.
    """
    sim = Simulator(cfg, geometry)
    yield from sim.iter_frames(start, stop)


def run(cfg: SimulateConfig) -> dict:
    """Stage entry point (``peaknet simulate``): write shards, truth, manifest and summary into
    ``cfg.run.out``; return the summary. See :func:`peaknet.simulate.writer.run`; MPI ranks and
    Slurm array tasks: :mod:`peaknet.simulate.distributed`."""
    from . import distributed
    from .writer import run as _run

    if distributed.is_distributed(cfg):
        return distributed.run(cfg)
    return _run(cfg)
