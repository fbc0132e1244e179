"""The detector: static per-run maps, spot rendering, photon counting and artifacts.

Coordinates: frames are (P, H, W) stacks (module, ss, fs) with the centre of pixel (i, j) at
(i, j); lab frame as in :mod:`peaknet.io.geometry` (beam along +z, metres).

Pipeline for one frame (all in expected *photons* until :func:`counts_to_adu`):

1. background expectation per pixel ``b = w·Bw + d·Bd + a·Ba`` with static basis maps
   (water ring, diffuse, air; each already multiplied by the pixel's solid angle in µsr, the
   polarisation factor and the beamstop transmission T) and per-frame scalars w, d, a;
2. :func:`render_spots` adds every reflection's photons as a pixel-integrated (3x3 sub-samples)
   pseudo-Voigt with an elliptical covariance, inside a small window only, and decides which
   reflections are *detectable* and which pixels form the peak mask (criteria in
   :class:`peaknet.simulate.config.TruthSection`);
3. :func:`counts_to_adu` draws Poisson photon counts, multiplies by the gain (ADU/photon) and
   the flat field, adds the per-module offset and Gaussian readout noise, zeroes dead pixels
   and modules, and clips at saturation; hot pixels are added afterwards.

Random numbers of the pixel noise: one 64-bit SplitMix64 output per pixel; its high 32 bits
drive the Poisson inversion (PTRS with further streams for λ >= 10), its low 32 bits a normal
deviate (inverse-CDF table with linear interpolation, exact inverse in the extreme bins).

Random numbers in the numba kernels come from a counter-based generator (SplitMix64 of a
per-frame key and the pixel index), so a frame is reproducible bit for bit from its key alone,
independent of threads or of which other frames were generated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

__all__ = [
    "StaticMaps",
    "build_static_maps",
    "water_profile",
    "diffuse_profile",
    "air_profile",
    "spot_covariances",
    "render_spots",
    "counts_to_adu",
    "poisson_sample",
    "normal_sample",
]

MAX_HALF = 12  # largest spot window half-size (pixels)
_SUB = 3  # sub-samples per pixel and axis for pixel integration


# ============================================================================================
# background profiles (dimensionless shapes; amplitudes come from the config)
# ============================================================================================
def water_profile(s: np.ndarray, d_ring: float = 3.2, width: float = 0.08) -> np.ndarray:
    """Liquid-water scattering vs 1/d (1/Å): main ring at 1/d_ring (Gaussian, rms ``width``),
    a second hump (0.45 x) at 1/2.1 Å and a low-angle floor. Maximum ~1 at the main ring."""
    s = np.asarray(s, dtype=np.float64)
    s0 = 1.0 / d_ring
    main = np.exp(-0.5 * ((s - s0) / width) ** 2)
    second = 0.45 * np.exp(-0.5 * ((s - 0.476) / 0.06) ** 2)
    floor = 0.12 * np.clip(s / s0, 0.0, 1.0)
    return main + second + floor


def diffuse_profile(s: np.ndarray, width: float = 0.25) -> np.ndarray:
    """Amorphous / diffuse scattering vs 1/d (1/Å): exp(-(1/d)² / (2·width²)), 1 at 1/d = 0."""
    s = np.asarray(s, dtype=np.float64)
    return np.exp(-0.5 * (s / width) ** 2)


def air_profile(two_theta: np.ndarray) -> np.ndarray:
    """Air / window scatter vs scattering angle (radians): 1 / (1 + (2θ / 0.04)²)."""
    t = np.asarray(two_theta, dtype=np.float64)
    return 1.0 / (1.0 + (t / 0.04) ** 2)


# ============================================================================================
# static maps
# ============================================================================================
@dataclass
class StaticMaps:
    """Per-run detector maps, all (P, H, W) unless noted.

    s: 1/d (1/Å) at the nominal wavelength (float32); two_theta (float32, rad);
    solid_angle: sr (float32); polarisation (float32);
    bw, bd, ba: background basis maps in photons per (photon/µsr of amplitude), including the
    beamstop shadow (float32);
    transmission: beamstop transmission (float32, 1 = unobstructed);
    gain: flat field (float32, mean 1; 0 at dead pixels); good: bool pixels that read out
    (geometry mask minus dead and hot pixels); dead: bool fixed dead pixels; hot_index: (K,) int64 flat indices of
    hot pixels; hot_level: (K,) float64 their mean photons per frame;
    pixel_size: (P,) metres; distance: (P, H, W) float32 sample-pixel distance in metres.
    """

    s: np.ndarray
    two_theta: np.ndarray
    solid_angle: np.ndarray
    polarisation: np.ndarray
    bw: np.ndarray
    bd: np.ndarray
    ba: np.ndarray
    transmission: np.ndarray
    gain: np.ndarray
    good: np.ndarray
    dead: np.ndarray
    hot_index: np.ndarray
    hot_level: np.ndarray
    pixel_size: np.ndarray
    distance: np.ndarray

    @property
    def shape(self) -> tuple:
        return self.s.shape


def _solid_angle(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solid angle (sr) of each pixel (P, H, W) and each module's pixel size (P,) in metres,
    from the pixel-centre positions (P, H, W, 3) (module step vectors from neighbours)."""
    P, H, W, _ = pos.shape
    om = np.zeros((P, H, W))
    psize = np.zeros(P)
    for p in range(P):
        blk = pos[p]
        fsv = np.nanmedian((blk[:, 1:] - blk[:, :-1]).reshape(-1, 3), axis=0) if W > 1 else np.array([1e-4, 0, 0])
        ssv = np.nanmedian((blk[1:] - blk[:-1]).reshape(-1, 3), axis=0) if H > 1 else np.array([0, 1e-4, 0])
        n = np.cross(fsv, ssv)
        area = np.linalg.norm(n)
        n = n / area
        psize[p] = math.sqrt(area)
        dist2 = np.einsum("hwi,hwi->hw", blk, blk)
        cosang = np.abs(blk @ n) / np.sqrt(dist2)
        om[p] = area * cosang / dist2
    return om, psize


def build_static_maps(
    geom,
    wavelength_A: float,
    clen_m: float,
    *,
    polarisation: float,
    water_ring_d: float,
    water_ring_width: float,
    diffuse_width: float,
    beamstop_radius_mm: float,
    beamstop_transmission: float,
    beamstop_arm_width_mm: float,
    beamstop_arm_angle_deg: float,
    flat_field: float,
    hot_pixel_fraction: float,
    hot_pixel_photons: tuple,
    dead_pixel_fraction: float,
    rng: np.random.Generator,
) -> StaticMaps:
    """Compute the static maps for geometry ``geom`` (a :class:`peaknet.io.geometry.Geometry`
    with a numeric clen) at ``wavelength_A``; ``rng`` draws the fixed per-run defects."""
    pos = geom.pixel_positions(clen=clen_m)  # (P, H, W, 3) metres, NaN off-panel
    on = np.isfinite(pos[..., 0])
    pos = np.where(on[..., None], pos, np.array([0.0, 0.0, 1.0]))
    dist = np.linalg.norm(pos, axis=-1)
    dirs = pos / dist[..., None]
    tth = np.arccos(np.clip(dirs[..., 2], -1.0, 1.0))
    s = 2.0 * np.sin(0.5 * tth) / wavelength_A
    om, psize = _solid_angle(pos)
    pol = polarisation * (1.0 - dirs[..., 0] ** 2) + (1.0 - polarisation) * (1.0 - dirs[..., 1] ** 2)
    base = om * 1e6 * pol  # µsr x polarisation
    bw = base * water_profile(s, water_ring_d, water_ring_width)
    bd = base * diffuse_profile(s, diffuse_width)
    ba = base * air_profile(tth)
    # beamstop shadow, in the plane z = clen (tangent-plane coordinates of the ray, metres)
    tx = dirs[..., 0] / np.maximum(dirs[..., 2], 1e-6) * clen_m
    ty = dirs[..., 1] / np.maximum(dirs[..., 2], 1e-6) * clen_m
    trans = np.ones(tth.shape)
    edge = float(np.median(psize))  # soften edges over ~1 pixel
    if beamstop_radius_mm > 0:
        r = np.hypot(tx, ty)
        rb = beamstop_radius_mm * 1e-3
        f = np.clip((r - rb) / edge + 0.5, 0.0, 1.0)  # 0 inside, 1 outside
        trans = np.minimum(trans, beamstop_transmission + (1 - beamstop_transmission) * f)
        if beamstop_arm_width_mm > 0:
            ang = math.radians(beamstop_arm_angle_deg)
            ux, uy = math.cos(ang), math.sin(ang)
            along = tx * ux + ty * uy
            across = np.abs(-tx * uy + ty * ux)
            hw = 0.5 * beamstop_arm_width_mm * 1e-3
            f_arm = np.clip((across - hw) / edge + 0.5, 0.0, 1.0)
            f_arm = np.where(along > 0, f_arm, 1.0)
            trans = np.minimum(trans, beamstop_transmission + (1 - beamstop_transmission) * f_arm)
    good = np.asarray(geom.good_pixel_mask(), bool) & on
    n_pix = good.size
    flat = good.ravel().nonzero()[0]
    n_dead = int(round(dead_pixel_fraction * flat.size))
    n_hot = int(round(hot_pixel_fraction * flat.size))
    pick = rng.choice(flat.size, size=min(n_dead + n_hot, flat.size), replace=False)
    dead_idx = np.sort(flat[pick[:n_dead]])
    hot_idx = np.sort(flat[pick[n_dead:]])
    lo, hi = float(hot_pixel_photons[0]), float(hot_pixel_photons[1])
    hot_level = np.exp(rng.uniform(math.log(max(lo, 1e-3)), math.log(max(hi, 1e-3)), size=hot_idx.size))
    dead = np.zeros(n_pix, bool)
    dead[dead_idx] = True
    dead = dead.reshape(good.shape)
    readable = good & ~dead
    readable.ravel()[hot_idx] = False
    gain = (1.0 + flat_field * rng.standard_normal(good.shape)).clip(0.5, 1.5)
    f32 = np.float32
    return StaticMaps(
        s=s.astype(f32),
        two_theta=tth.astype(f32),
        solid_angle=om.astype(f32),
        polarisation=pol.astype(f32),
        bw=np.where(on, bw * trans, 0).astype(f32),
        bd=np.where(on, bd * trans, 0).astype(f32),
        ba=np.where(on, ba * trans, 0).astype(f32),
        transmission=trans.astype(f32),
        gain=np.where(dead | ~on, 0.0, gain).astype(f32),
        good=readable,
        dead=dead,
        hot_index=hot_idx.astype(np.int64),
        hot_level=hot_level,
        pixel_size=psize,
        distance=dist.astype(f32),
    )


# ============================================================================================
# spot shapes
# ============================================================================================
def spot_covariances(
    geom,
    clen_m: float,
    directions: np.ndarray,
    panel: np.ndarray,
    ss: np.ndarray,
    fs: np.ndarray,
    sigma_radial: np.ndarray,
    sigma_tangential: np.ndarray,
    psf_px: float,
    extra: np.ndarray,
) -> np.ndarray:
    """Covariances (N, 2, 2) in pixels², axes (ss, fs), of spots on the detector.

    The angular widths (radians, rms) along the radial (2θ) and tangential (around the beam)
    directions are mapped to pixels with the local Jacobian of the projection, found by
    projecting rays rotated by a small angle (exact for tilted panels); ``psf_px`` adds an
    isotropic point-spread and ``extra`` (N, 2, 2) any additional pixel-space term.
    """
    d = np.asarray(directions, dtype=np.float64)
    n = len(d)
    cov = np.zeros((n, 2, 2))
    if n == 0:
        return cov
    zhat = np.array([0.0, 0.0, 1.0])
    et = np.cross(zhat, d)
    nt = np.linalg.norm(et, axis=1)
    small = nt < 1e-9
    et[small] = np.array([0.0, 1.0, 0.0])
    nt[small] = 1.0
    et /= nt[:, None]
    er = np.cross(et, d)
    er /= np.linalg.norm(er, axis=1, keepdims=True)
    delta = 2e-4
    pr, sr, fr, vr = geom.project(d + delta * er, clen=clen_m)
    pt, st, ft, vt = geom.project(d + delta * et, clen=clen_m)
    ok = vr & vt & (pr == panel) & (pt == panel)
    J = np.zeros((n, 2, 2))  # columns: d(ss, fs)/d(radial), d(ss, fs)/d(tangential)
    J[:, 0, 0] = (sr - ss) / delta
    J[:, 1, 0] = (fr - fs) / delta
    J[:, 0, 1] = (st - ss) / delta
    J[:, 1, 1] = (ft - fs) / delta
    # fallback (ray near a panel edge): isotropic, pixels per radian from the neighbours
    if not ok.all():
        pos = geom.lab_positions(panel[~ok], ss[~ok], fs[~ok], clen=clen_m)
        pos1 = geom.lab_positions(panel[~ok], ss[~ok], fs[~ok] + 1.0, clen=clen_m)
        step = np.linalg.norm(pos1 - pos, axis=1)
        dist = np.linalg.norm(pos, axis=1)
        scale = np.where(np.isfinite(step) & (step > 0), dist / step, 1000.0)
        J[~ok] = 0.0
        J[~ok, 0, 0] = scale
        J[~ok, 1, 1] = scale
    S = np.zeros((n, 2, 2))
    S[:, 0, 0] = np.asarray(sigma_radial) ** 2
    S[:, 1, 1] = np.asarray(sigma_tangential) ** 2
    cov = J @ S @ np.transpose(J, (0, 2, 1))
    cov[:, 0, 0] += psf_px**2
    cov[:, 1, 1] += psf_px**2
    cov += extra
    return cov


# ============================================================================================
# counter-based random numbers (numba)
# ============================================================================================
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TWO32 = 4294967296.0
_NORM_BITS = 12  # normal deviates: inverse-CDF table of 2^12 bins, linear inside a bin


def _normal_table() -> np.ndarray:
    """Φ⁻¹(j / 2^12) for j = 0..2^12 (the ends are only placeholders; those bins use the exact
    inverse)."""
    from scipy.special import ndtri

    n = 1 << _NORM_BITS
    t = ndtri(np.arange(n + 1) / n)
    t[0], t[-1] = t[1], t[-2]
    return t


NORMAL_TABLE = _normal_table()
_EXP_NEG_INT = np.exp(-np.arange(12, dtype=np.float64))


@numba.njit(cache=True, inline="always")
def _mix(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=True, inline="always")
def _bits(key, i, stream):
    """64 random bits for counter i of stream j: SplitMix64 output at state key + (i, j)."""
    return _mix(key + (np.uint64(i) + np.uint64(stream) * np.uint64(0x100000000000)) * _GOLDEN)


@numba.njit(cache=True, inline="always")
def _uniform(key, i, stream):
    """Uniform in (0, 1) (53 bits) from (key, counter i, stream j)."""
    return ((_bits(key, i, stream) >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True)
def _norm_ppf(p):
    """Inverse normal CDF (Acklam's rational approximation, |rel. error| < 1.2e-9)."""
    if p < 0.02425:
        q = math.sqrt(-2.0 * math.log(p))
        return (((((-7.784894002430293e-03 * q - 3.223964580411365e-01) * q - 2.400758277161838e00) * q
                  - 2.549732539343734e00) * q + 4.374664141464968e00) * q + 2.938163982698783e00) / (
            (((7.784695709041462e-03 * q + 3.224671290700398e-01) * q + 2.445134137142996e00) * q
             + 3.754408661907416e00) * q + 1.0)
    if p > 0.97575:
        q = math.sqrt(-2.0 * math.log(1.0 - p))
        return -(((((-7.784894002430293e-03 * q - 3.223964580411365e-01) * q - 2.400758277161838e00) * q
                   - 2.549732539343734e00) * q + 4.374664141464968e00) * q + 2.938163982698783e00) / (
            (((7.784695709041462e-03 * q + 3.224671290700398e-01) * q + 2.445134137142996e00) * q
             + 3.754408661907416e00) * q + 1.0)
    q = p - 0.5
    r = q * q
    return (((((-3.969683028665376e01 * r + 2.209460984245205e02) * r - 2.759285104469687e02) * r
              + 1.383577518672690e02) * r - 3.066479806614716e01) * r + 2.506628277459239e00) * q / (
        ((((-5.447609879822406e01 * r + 1.615858368580409e02) * r - 1.556989798598866e02) * r
          + 6.680131188771972e01) * r - 1.328068155288572e01) * r + 1.0)


@numba.njit(cache=True, inline="always")
def _normal_from_low32(x, table):
    """Standard normal from the low 32 bits of x: table lookup with linear interpolation
    (the two outermost bins, |z| > 3.4, use the exact inverse CDF)."""
    low = x & np.uint64(0xFFFFFFFF)
    j = np.int64(low >> np.uint64(32 - _NORM_BITS))
    if j == 0 or j == (1 << _NORM_BITS) - 1:
        return _norm_ppf((np.float64(low) + 0.5) / _TWO32)
    f = (np.float64(low & np.uint64((1 << (32 - _NORM_BITS)) - 1)) + 0.5) * (1.0 / (1 << (32 - _NORM_BITS)))
    return table[j] + f * (table[j + 1] - table[j])


@numba.njit(cache=True, inline="always")
def _exp_neg(lam, exp_int):
    """exp(-lam) for 0 <= lam < 11: table for the integer part, Taylor (degree 8, around 0.5)
    for the rest; relative error < 1e-8."""
    m = int(lam)
    r = lam - m - 0.5
    # exp(-r) for |r| <= 0.5
    e = 1.0 + r * (-1.0 + r * (0.5 + r * (-1.0 / 6 + r * (1.0 / 24 + r * (-1.0 / 120 + r * (1.0 / 720 + r * (-1.0 / 5040 + r * (1.0 / 40320))))))))
    return exp_int[m] * 0.6065306597126334 * e


@numba.njit(cache=True)
def _poisson_ptrs(lam, key, i):
    """Poisson(lam >= 10): Hörmann's transformed rejection with squeeze (PTRS), as in numpy;
    uniforms from streams 2, 3, ... of counter i."""
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    j = 2
    while True:
        U = _uniform(key, i, j) - 0.5
        V = _uniform(key, i, j + 1)
        j += 2
        us = 0.5 - abs(U)
        k = math.floor((2.0 * a / us + b) * U + lam + 0.43)
        if us >= 0.07 and V <= vr:
            return k
        if k < 0.0 or (us < 0.013 and V > us):
            continue
        if (math.log(V) + math.log(invalpha) - math.log(a / (us * us) + b)) <= (-lam + k * loglam - math.lgamma(k + 1.0)):
            return k


@numba.njit(cache=True, inline="always")
def _poisson_u(lam, u, key, i, exp_int):
    """Poisson(lam) by inversion of the CDF with the uniform u when lam < 10, else PTRS.

    For lam < 3 the first eight CDF terms are compared without branches (the count of terms
    below u), which avoids branch mispredictions; the rare rest continues sequentially."""
    if lam <= 0.0:
        return 0.0
    if lam >= 10.0:
        return _poisson_ptrs(lam, key, i)
    p = _exp_neg(lam, exp_int)
    if lam < 3.0:
        c = p
        n = np.float64(u > c)
        p *= lam
        c += p
        n += np.float64(u > c)
        p *= lam * 0.5
        c += p
        n += np.float64(u > c)
        p *= lam * (1.0 / 3.0)
        c += p
        n += np.float64(u > c)
        p *= lam * 0.25
        c += p
        n += np.float64(u > c)
        p *= lam * 0.2
        c += p
        n += np.float64(u > c)
        p *= lam * (1.0 / 6.0)
        c += p
        n += np.float64(u > c)
        p *= lam * (1.0 / 7.0)
        c += p
        n += np.float64(u > c)
        if n < 8.0:
            return n
        k = 7.0
    else:
        c = p
        k = 0.0
    while u > c and k < 100.0:
        k += 1.0
        p *= lam / k
        c += p
    return k


@numba.njit(cache=True)
def poisson_sample(lam, key):
    """Poisson draws (same generator as :func:`counts_to_adu`) for an array of means;
    counter = flat index. For tests."""
    out = np.empty(lam.size)
    flat = lam.ravel()
    exp_int = np.exp(-np.arange(12.0))
    for i in range(flat.size):
        x = _bits(key, i, 0)
        u = (np.float64(x >> np.uint64(32)) + 0.5) / _TWO32
        out[i] = _poisson_u(flat[i], u, key, i, exp_int)
    return out.reshape(lam.shape)


@numba.njit(cache=True)
def normal_sample(n, key, table):
    """n standard-normal draws (same generator as :func:`counts_to_adu`). For tests."""
    out = np.empty(n)
    for i in range(n):
        out[i] = _normal_from_low32(_bits(key, i, 0), table)
    return out


# ============================================================================================
# spot rendering (numba)
# ============================================================================================
@numba.njit(cache=True)
def render_spots(
    panel, ss, fs, cov, eta, photons,
    bw, bd, ba, trans, good, alive,
    w_sc, d_sc, a_sc, read_var_ph,
    area_fraction, snr_threshold, mask_fraction, mask_snr, min_transmission,
    spot_map, mask,
):
    """Render spots into ``spot_map`` (P, H, W float32, photons; accumulated) and set ``mask``.

    panel (N,) int, ss/fs (N,) float pixel-centre coordinates, cov (N, 2, 2) pixels² (ss, fs),
    eta (N,) pseudo-Voigt Lorentzian fraction, photons (N,) expected integrated photons.
    Background expectation is rebuilt from the (shadowed) basis maps: w_sc·bw + d_sc·bd + a_sc·ba;
    ``trans`` (the beamstop transmission) attenuates the spots.
    good (P, H, W) bool working pixels; alive (P,) bool working modules. read_var_ph: readout
    variance in photons² (per module, (P,)).

    Returns per-spot arrays: peak (expected photons in the brightest pixel, after shadow),
    signal (photons in the spot area), background (photons in the area), npix_area, snr,
    detectable (bool), npix_mask.
    """
    n = panel.size
    P, H, W = spot_map.shape
    peak = np.zeros(n)
    signal = np.zeros(n)
    bgsum = np.zeros(n)
    narea = np.zeros(n, np.int32)
    snr = np.zeros(n)
    detectable = np.zeros(n, np.bool_)
    nmask = np.zeros(n, np.int32)
    size = 2 * MAX_HALF + 1
    prof = np.zeros((size, size))
    inv_sub = 1.0 / _SUB
    ln2x2 = 2.0 * math.log(2.0)
    for k in range(n):
        p = panel[k]
        c00 = cov[k, 0, 0]
        c01 = cov[k, 0, 1]
        c11 = cov[k, 1, 1]
        det = c00 * c11 - c01 * c01
        if det <= 1e-12:
            det = 1e-12
        i00 = c11 / det
        i01 = -c01 / det
        i11 = c00 / det
        lmax = 0.5 * (c00 + c11) + math.sqrt(0.25 * (c00 - c11) ** 2 + c01 * c01)
        half = int(math.ceil(3.5 * math.sqrt(lmax) + 1.0))
        if eta[k] > 0.0:
            half += 2
        if half > MAX_HALF:
            half = MAX_HALF
        if half < 2:
            half = 2
        ci = int(math.floor(ss[k] + 0.5))
        cj = int(math.floor(fs[k] + 0.5))
        e = eta[k]
        tot = 0.0
        for a in range(-half, half + 1):
            for b in range(-half, half + 1):
                y0 = ci + a
                x0 = cj + b
                val = 0.0
                if 0 <= y0 < H and 0 <= x0 < W:
                    for u in range(_SUB):
                        dy = y0 - ss[k] + (u + 0.5) * inv_sub - 0.5
                        for v in range(_SUB):
                            dx = x0 - fs[k] + (v + 0.5) * inv_sub - 0.5
                            m2 = i00 * dy * dy + 2.0 * i01 * dy * dx + i11 * dx * dx
                            val += (1.0 - e) * math.exp(-0.5 * m2) + e / (1.0 + m2 / ln2x2)
                prof[a + half, b + half] = val
                tot += val
        if tot <= 0.0:
            continue
        # normalise: the window holds all of the spot's photons
        pmax = 0.0
        for a in range(2 * half + 1):
            for b in range(2 * half + 1):
                prof[a, b] /= tot
                if prof[a, b] > pmax:
                    pmax = prof[a, b]
        # spot area, background, snr; peak pixel
        S = 0.0
        B = 0.0
        na = 0
        vr = 0.0
        best = -1.0
        bi = ci
        bj = cj
        for a in range(2 * half + 1):
            for b in range(2 * half + 1):
                y0 = ci + a - half
                x0 = cj + b - half
                if not (0 <= y0 < H and 0 <= x0 < W):
                    continue
                t = trans[p, y0, x0]
                sp = photons[k] * prof[a, b] * t
                if sp > best:
                    best = sp
                    bi = y0
                    bj = x0
                if prof[a, b] >= area_fraction * pmax:
                    S += sp
                    B += w_sc * bw[p, y0, x0] + d_sc * bd[p, y0, x0] + a_sc * ba[p, y0, x0]
                    vr += read_var_ph[p]
                    na += 1
        peak[k] = best
        signal[k] = S
        bgsum[k] = B
        narea[k] = na
        den = S + B + vr
        s_n = S / math.sqrt(den) if den > 0 else 0.0
        snr[k] = s_n
        ok = (
            s_n >= snr_threshold
            and alive[p]
            and good[p, bi, bj]
            and trans[p, bi, bj] >= min_transmission
        )
        detectable[k] = ok
        # accumulate photons; mask
        for a in range(2 * half + 1):
            for b in range(2 * half + 1):
                y0 = ci + a - half
                x0 = cj + b - half
                if not (0 <= y0 < H and 0 <= x0 < W):
                    continue
                sp = photons[k] * prof[a, b] * trans[p, y0, x0]
                spot_map[p, y0, x0] += sp
                if ok and good[p, y0, x0]:
                    bpix = w_sc * bw[p, y0, x0] + d_sc * bd[p, y0, x0] + a_sc * ba[p, y0, x0]
                    if (y0 == bi and x0 == bj) or (
                        sp >= mask_fraction * best and sp >= mask_snr * math.sqrt(bpix + read_var_ph[p])
                    ):
                        if not mask[p, y0, x0]:
                            mask[p, y0, x0] = True
                        nmask[k] += 1
    return peak, signal, bgsum, narea, snr, detectable, nmask


# ============================================================================================
# photons -> ADU (numba)
# ============================================================================================
@numba.njit(cache=True)
def counts_to_adu(
    spot_map, bw, bd, ba, gain, alive,
    w_sc, d_sc, a_sc, adu_per_photon, read_sigma_adu, offset_adu, max_adu, saturate, adu_step, key, table, out,
):
    """Fill ``out`` (P, H, W float32) with detector values in ADU.

    Per pixel: λ = spot_map + w_sc·bw + d_sc·bd + a_sc·ba photons (the basis maps already hold
    the beamstop shadow); n ~ Poisson(λ); value = n · adu_per_photon · gain + offset_adu[module]
    + read_sigma_adu[module] · N(0, 1); 0 for dead pixels (gain 0) and dead modules (alive
    False); min(value, max_adu) if saturate; rounded to a multiple of ``adu_step`` if > 0.
    ``key`` (uint64) seeds this frame's counter-based
    random stream; ``table`` is :data:`NORMAL_TABLE`.
    """
    P, H, W = out.shape
    exp_int = np.exp(-np.arange(12.0))
    inv_step = 1.0 / adu_step if adu_step > 0.0 else 0.0
    wf = np.float32(w_sc)
    df = np.float32(d_sc)
    af = np.float32(a_sc)
    for p in range(P):
        if not alive[p]:
            out[p] = 0.0
            continue
        off = offset_adu[p]
        rs = read_sigma_adu[p]
        base = p * H * W
        sm = spot_map[p]
        b1 = bw[p]
        b2 = bd[p]
        b3 = ba[p]
        g = gain[p]
        o = out[p]
        for y in range(H):
            row = base + y * W
            for x in range(W):
                gx = g[y, x]
                if gx == 0.0:
                    o[y, x] = 0.0
                    continue
                lam = sm[y, x] + wf * b1[y, x] + df * b2[y, x] + af * b3[y, x]
                bits = _bits(key, row + x, 0)
                u = (np.float64(bits >> np.uint64(32)) + 0.5) * (1.0 / _TWO32)
                nph = _poisson_u(lam, u, key, row + x, exp_int)
                v = nph * adu_per_photon * gx + off
                if rs > 0.0:
                    v += rs * _normal_from_low32(bits, table)
                if saturate and v > max_adu:
                    v = max_adu
                if adu_step > 0.0:
                    v = math.floor(v * inv_step + 0.5) * adu_step
                o[y, x] = v
    return out
