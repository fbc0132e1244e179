"""Reflection prediction for a still: Ewald sphere with bandwidth, divergence and mosaicity,
partiality, Wilson intensities and the resolution fall-off.

Conventions: lab frame with the beam along +z; wave vectors without 2π (``|k| = 1/λ``, 1/Å);
``q = U B h`` (see :mod:`peaknet.simulate.crystal`). The Ewald sphere has its centre at
``-k ẑ`` and passes through the origin; a reciprocal-lattice point q is in reflecting position
when ``|q + k ẑ| = k``.

Partiality model (a Gaussian "reflecting range", as in CrystFEL's ``gaussian`` partiality):
the excitation error ``ε = |q + k ẑ| - k`` (1/Å) is compared with the rms width of the
reflecting range

    σ_ε² = ρ² + (|q| σ_mos)² + (|q| σ_div)² + (λ |q|² σ_bw / 2)²

where ρ = 1/(2·domain size) is the reciprocal-lattice-point radius, σ_mos and σ_div the rms
mosaic spread and beam divergence (radians) and σ_bw the rms relative bandwidth (the last term
is ``dε/dk · σ_k = 2 sin²θ · k σ_bw``). Partiality ``p = exp(-ε² / (2 σ_ε²))`` in [0, 1].

Intensities: ``I = scale · J(hkl) · exp(-B / (2 d²)) · P_pol · p`` photons, with J(hkl) an
acentric Wilson draw (exponential, mean 1) that depends only on (structure seed, ±hkl) so a
protein keeps its relative intensities from frame to frame (Friedel pairs equal; other
symmetry equivalents are not merged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

__all__ = [
    "FWHM_TO_SIGMA",
    "HC_EV_A",
    "Prediction",
    "wilson_intensities",
    "reflecting_range",
    "predict_still",
    "polarisation_factor",
    "diffracted_directions",
]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
HC_EV_A = 12398.419843320026  # h c in eV·Å: λ[Å] = HC_EV_A / E[eV]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def wilson_intensities(hkl: np.ndarray, structure_seed: int) -> np.ndarray:
    """J(hkl) (N,) float64: deterministic exponential(1) draws (acentric Wilson statistics)
    keyed by (structure_seed, hkl) with Friedel mates equal."""
    h = np.asarray(hkl, dtype=np.int64)
    # canonical Friedel representative: the first non-zero index positive
    first = np.where(h[:, 0] != 0, h[:, 0], np.where(h[:, 1] != 0, h[:, 1], h[:, 2]))
    h = np.where((first < 0)[:, None], -h, h)
    key = ((h[:, 0] + 1024) << 42) ^ ((h[:, 1] + 1024) << 21) ^ (h[:, 2] + 1024)
    with np.errstate(over="ignore"):
        x = key.astype(np.uint64) ^ (np.uint64(structure_seed) * np.uint64(0xD1B54A32D192ED03))
    x = _splitmix64(_splitmix64(x))
    u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)
    return -np.log(u)


def reflecting_range(
    q_norm: np.ndarray,
    wavelength_A: float,
    mosaicity_rad_sigma: float,
    divergence_rad_sigma: float,
    bandwidth_sigma: float,
    rlp_radius: float,
) -> np.ndarray:
    """σ_ε (1/Å) for reciprocal-lattice points of length ``q_norm`` (see the module doc)."""
    q = np.asarray(q_norm, dtype=np.float64)
    return np.sqrt(
        rlp_radius**2
        + (q * mosaicity_rad_sigma) ** 2
        + (q * divergence_rad_sigma) ** 2
        + (0.5 * wavelength_A * q * q * bandwidth_sigma) ** 2
    )


def polarisation_factor(directions: np.ndarray, fraction_x: float = 1.0) -> np.ndarray:
    """Polarisation factor (N,) of unit scattered directions (N, 3) for a beam along +z with a
    fraction ``fraction_x`` of its intensity polarised along x (the rest along y)."""
    d = np.asarray(directions)
    return fraction_x * (1.0 - d[..., 0] ** 2) + (1.0 - fraction_x) * (1.0 - d[..., 1] ** 2)


def diffracted_directions(q_lab: np.ndarray, k: float) -> np.ndarray:
    """Unit directions (N, 3) of the rays diffracted by q (N, 3) for |k| = k (1/Å): the ray
    through the point of the Ewald sphere nearest to q, i.e. ``(q + k ẑ) / |q + k ẑ|``."""
    v = np.array(q_lab, dtype=np.float64, copy=True)
    v[:, 2] += k
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@dataclass
class Prediction:
    """Reflections of one lattice in one still that are excited (partiality >= cut).

    index (N,) int64 rows into the run's hkl list; hkl (N, 3) int32; q (N, 3) float64 lab
    (1/Å); d (N,) Å; excitation (N,) ε in 1/Å; sigma_eps (N,) 1/Å; partiality (N,);
    directions (N, 3) unit diffracted rays (lab); two_theta (N,) radians;
    photons (N,) expected integrated photons (all factors, before the detector).
    """

    index: np.ndarray
    hkl: np.ndarray
    q: np.ndarray
    d: np.ndarray
    excitation: np.ndarray
    sigma_eps: np.ndarray
    partiality: np.ndarray
    directions: np.ndarray
    two_theta: np.ndarray
    photons: np.ndarray

    def __len__(self) -> int:
        return int(self.index.size)

    def take(self, sel) -> "Prediction":
        return Prediction(**{k: getattr(self, k)[sel] for k in self.__dataclass_fields__})


@numba.njit(cache=True)
def _excited(hkl, UB, k, mos, div, bw, rho2, wavelength, cut):
    """Indices of reflections with |ε| <= cut·σ_ε, and their q (lab), ε, σ_ε."""
    n = hkl.shape[0]
    idx = np.empty(n, np.int64)
    m = 0
    for i in range(n):
        h = float(hkl[i, 0])
        kk = float(hkl[i, 1])
        l = float(hkl[i, 2])
        qx = UB[0, 0] * h + UB[0, 1] * kk + UB[0, 2] * l
        qy = UB[1, 0] * h + UB[1, 1] * kk + UB[1, 2] * l
        qz = UB[2, 0] * h + UB[2, 1] * kk + UB[2, 2] * l
        q2 = qx * qx + qy * qy + qz * qz
        # |q + k z|² - k² = q² + 2 k qz;  ε ≈ (q² + 2 k qz) / (2k) to first order: use it as a
        # cheap pre-filter (exact ε below)
        s2 = q2 + 2.0 * k * qz
        sig2 = rho2 + q2 * (mos * mos + div * div) + (0.5 * wavelength * q2 * bw) ** 2
        lim = cut * math.sqrt(sig2)
        if abs(s2) > 2.0 * k * lim * 1.01 + lim * lim * 1.01:
            continue
        eps = math.sqrt(s2 + k * k) - k
        if abs(eps) <= lim:
            idx[m] = i
            m += 1
    return idx[:m]


def predict_still(
    hkl: np.ndarray,
    jhkl: np.ndarray,
    B: np.ndarray,
    U: np.ndarray,
    wavelength_A: float,
    *,
    mosaicity_rad_sigma: float,
    divergence_rad_sigma: float,
    bandwidth_sigma: float,
    rlp_radius: float,
    b_factor: float,
    scale: float,
    polarisation: float = 1.0,
    min_partiality: float = 0.01,
) -> Prediction:
    """Excited reflections of a crystal with orientation U (3x3) and reciprocal basis B (3x3).

    hkl (N, 3) int32 candidate reflections (e.g. :func:`~peaknet.simulate.crystal.enumerate_hkl`);
    jhkl (N,) their Wilson intensities; ``scale`` photons of a J = 1 reflection at d -> inf;
    only reflections with partiality >= ``min_partiality`` are returned.
    """
    k = 1.0 / wavelength_A
    UB = np.asarray(U, dtype=np.float64) @ np.asarray(B, dtype=np.float64)
    cut = math.sqrt(-2.0 * math.log(min_partiality))
    idx = _excited(
        np.ascontiguousarray(hkl), UB, k, mosaicity_rad_sigma, divergence_rad_sigma, bandwidth_sigma,
        rlp_radius**2, wavelength_A, cut,
    )
    q = hkl[idx].astype(np.float64) @ UB.T
    q2 = np.einsum("ij,ij->i", q, q)
    qn = np.sqrt(q2)
    eps = np.sqrt(np.maximum(q2 + 2.0 * k * q[:, 2] + k * k, 0.0)) - k
    sig = reflecting_range(qn, wavelength_A, mosaicity_rad_sigma, divergence_rad_sigma, bandwidth_sigma, rlp_radius)
    part = np.exp(-0.5 * (eps / sig) ** 2)
    d = 1.0 / qn
    dirs = diffracted_directions(q, k)
    tth = np.arccos(np.clip(dirs[:, 2], -1.0, 1.0))
    pol = polarisation_factor(dirs, polarisation)
    photons = scale * jhkl[idx] * np.exp(-b_factor * 0.5 * qn * qn) * pol * part
    return Prediction(
        index=idx.astype(np.int64),
        hkl=hkl[idx],
        q=q,
        d=d,
        excitation=eps,
        sigma_eps=sig,
        partiality=part,
        directions=dirs,
        two_theta=tth,
        photons=photons,
    )
