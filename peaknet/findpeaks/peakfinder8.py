"""peakfinder8: Bragg peak finding by radial statistics and region growing, compiled with numba.

The algorithm of Cheetah (Barty et al. 2014, J. Appl. Cryst. 47, 1118), as also implemented in
CrystFEL (``libcrystfel/src/peakfinder8.c``), OM and psana. Written from its description; the
steps, for one frame:

0. Pixels count only if masked in (mask != 0), finite, and ``min_res <= r <= max_res``
   (r: distance from the beam in pixels).
1. Radial statistics over the whole frame (all modules), bins ``rint(r)``. Thresholds start at
   high = +inf, low = -inf; 5 times: mean and std of the pixels with ``low < v < high`` in each
   bin, then ``high = max(mean + min_snr*std, adc_thresh)``, ``low = mean - min_snr*std``.
   A bin left empty gets high = +inf, low = -inf (and mean 0).
2. Per ASIC, in scan order: a seed is a pixel off the ASIC's 1-pixel border with
   ``v > high[bin]``, not yet visited.
3. Region growing, 8-connected, inside the ASIC, over pixels above their own bin's threshold not
   yet visited; every pixel reached is marked visited (accepted or not). Regions with fewer than
   ``min_pix_count`` or more than ``max_pix_count`` pixels are dropped.
4. Local background around the region's centre (centroid of ``v - mean[bin]``, rounded): the
   pixels (ds, df) with ``-2R <= ds, df < 2R`` and ``ds^2 + df^2 <= (2R)^2`` inside the ASIC,
   masked in, below their bin's threshold and never visited: their mean, std and maximum bgmax
   (bgmax starts at 0). With no such pixel: the bin's radial mean and std 0.01; a variance that is
   not positive also gives std 0.01.
5. ``tot = sum(v - local_mean)``, centroid weighted by the raw values v, ``maxi = max(0,
   max(v - local_mean))``, ``snr = tot / local_std``.
6. Accept if ``snr >= min_snr``, ``maxi >= bgmax - local_mean`` and the centroid lies inside the
   ASIC; keep the first ``max_num_peaks``.

Where this differs from the C code (on purpose): statistics are accumulated in float64 (C:
float32); an emptied bin's low threshold is -inf (C: FLT_MIN, which then drops non-positive
pixels of that bin); a zero local variance gives std 0.01 (C: snr 0, the peak is dropped);
region growing is a plain breadth-first search (the C loop also searches around one stale
buffer slot, which can attach unrelated pixels; ``Peakfinder8(..., emulate_c_growth=True)``
reproduces it). The radial iterations stop early at a fixed point (same sums as the previous
pass), which gives the same thresholds as running all five.

Validation (tools/bench/bench_peakfinder8.py, docs/benchmarks.md): on the real thermolysin CSPAD
frames, with the C loop emulated, the peak lists equal psana 4.3.4's peak for peak (same npix,
positions within 1e-3 px); with the default growth 97% of psana's peaks are reproduced within
0.5 px, the rest being the stale-slot artefacts.

Speed: one thread, no Python loop over pixels; the kernels release the GIL, so frames can be
processed from several threads with one :class:`Peakfinder8` (each call has its own buffers).
The first call compiles (a few seconds; cached on disk by numba afterwards).

Inputs are a (P, H, W) stack, or one 2-D array (one module; a psana-style slab such as
(32*185, 388) is one "module" of 32 x 2 ASICs). Output: a :class:`peaknet.peaks.PeakList` with
module index, module-local ss/fs (pixel centres on integers), intensity (tot), max_value (maxi),
snr and npix.
"""
from __future__ import annotations

from typing import Optional

import numba
import numpy as np

from ..peaks import PeakList
from .config import Peakfinder8Params

__all__ = ["Peakfinder8", "peakfinder8", "radial_thresholds", "N_ITERATIONS"]

N_ITERATIONS = 5

_NOPYTHON = dict(nopython=True, nogil=True, cache=True)


# --------------------------------------------------------------------------- kernels
@numba.jit(fastmath={"reassoc"}, **_NOPYTHON)  # reassociation lets the sums vectorise
def _radial_stats(data, pos, starts, adc_thresh, min_snr, iterations):
    """Iterative radial mean and high threshold per bin. Returns (mean, high) float64[nbins].

    data: the flat frame. The statically valid pixels (mask, resolution limits) are grouped by
    bin: pixel i goes to slot ``pos[i]`` (-1: not valid) and bin b owns the slots
    ``starts[b]:starts[b + 1]``. One pass in scan order copies the values into their slots
    (sequential reads), then every bin is iterated on in cache. Non-finite values never pass
    ``low < v < high``, so NaN/inf pixels drop out without a separate mask.
    """
    nbins = starts.size - 1
    vals = np.empty(starts[nbins], np.float32)
    for i in range(data.size):
        k = pos[i]
        if k >= 0:
            vals[k] = data[i]
    mean = np.zeros(nbins)
    high = np.full(nbins, np.inf)
    for b in range(nbins):
        i0 = starts[b]
        n = starts[b + 1] - i0
        if n == 0:
            continue
        buf = vals[i0:i0 + n]
        lo = -np.inf
        hi = np.inf
        mu = 0.0
        s1 = 0.0
        s2 = 0.0
        c = 0.0
        for it in range(iterations):
            p1, p2, pc = s1, s2, c
            s1 = 0.0
            s2 = 0.0
            c = 0.0  # a float count keeps the loop vectorisable
            for k in range(n):
                v = np.float64(buf[k])
                ok = v < hi and v > lo
                x = v if ok else 0.0
                s1 += x
                s2 += x * x
                c += 1.0 if ok else 0.0
            if it > 0 and s1 == p1 and s2 == p2 and c == pc:
                break  # same sums -> same thresholds: a fixed point, later passes repeat it
            if c == 0.0:
                mu = 0.0
                hi = np.inf
                lo = -np.inf
            else:
                mu = s1 / c
                var = s2 / c - mu * mu
                sd = np.sqrt(var) if var > 0.0 else 0.0
                h = mu + min_snr * sd
                hi = h if h > adc_thresh else adc_thresh
                lo = mu - min_snr * sd
        mean[b] = mu
        high[b] = hi
    return mean, high


@numba.jit(**_NOPYTHON)
def _static_pixels(r, mask, min_res, max_res, valid, bins):
    """valid = mask & finite r & min_res <= r <= max_res; bins = rint(r) (0 where r is not
    finite). mask of size 1 means "all good". Returns False if some r is negative."""
    all_good = mask.size == 1
    for i in range(r.size):
        x = r[i]
        if np.isfinite(x):
            if x < 0:
                return False
            bins[i] = np.int32(np.rint(x))
            valid[i] = (all_good or mask[i] != 0) and x >= min_res and x <= max_res
        else:
            bins[i] = 0
            valid[i] = 0
    return True


@numba.jit(**_NOPYTHON)
def _group_by_bin(bins, valid):
    """Counting sort of the valid pixels by bin: (pos, starts). Pixel i goes to slot pos[i]
    (-1 if not valid); bin b owns the slots starts[b]:starts[b + 1], in scan order."""
    nbins = 1
    for i in range(bins.size):
        if bins[i] + 1 > nbins:
            nbins = bins[i] + 1
    starts = np.zeros(nbins + 1, np.int64)
    for i in range(bins.size):
        if valid[i]:
            starts[bins[i] + 1] += 1
    for b in range(nbins):
        starts[b + 1] += starts[b]
    fill = starts[:-1].copy()
    pos = np.empty(bins.size, np.int32)  # frames stay far below 2**31 pixels
    for i in range(bins.size):
        if valid[i]:
            b = bins[i]
            pos[i] = fill[b]
            fill[b] += 1
        else:
            pos[i] = -1
    return pos, starts


_SEARCH_SS = (0, -1, -1, -1, 0, 0, 1, 1, 1)
_SEARCH_FS = (0, -1, 0, 1, -1, 1, -1, 0, 1)


@numba.jit(**_NOPYTHON)
def _c_growth(data, valid, bins, high, p, ss, fs, s0, f0, ah, aw, visited, c_ss, c_fs, q_ss, q_fs):
    """Region growing exactly as the C code (Cheetah/CrystFEL/OM/psana) loops it.

    The C loop visits the slots 0..n *inclusive* of its coordinate buffer, so each pass also
    searches around slot n: a stale position left by an earlier region (possibly of another
    ASIC), or 0 in a fresh buffer. Above-threshold pixels next to it join the current region even
    though they are not connected to it. Kept only to show that this quirk explains the
    differences from psana; returns the region size, pixels in q_ss/q_fs (module coordinates).
    """
    c_ss[0] = ss - s0
    c_fs[0] = fs - f0
    n = 0
    while True:
        last = n
        k = 0
        while k <= n:
            for j in range(9):
                y_loc = c_ss[k] + _SEARCH_SS[j]  # re-read: slot k == n may just have changed
                x_loc = c_fs[k] + _SEARCH_FS[j]
                if y_loc < 0 or y_loc >= ah or x_loc < 0 or x_loc >= aw:
                    continue
                y = s0 + y_loc
                x = f0 + x_loc
                if visited[p, y, x] or not valid[p, y, x]:
                    continue
                v = data[p, y, x]
                if v > high[bins[p, y, x]] and v != np.inf:
                    c_ss[n] = y_loc
                    c_fs[n] = x_loc
                    visited[p, y, x] = 1
                    q_ss[n] = y
                    q_fs[n] = x
                    n += 1
            k += 1
        if last == n:
            return n


@numba.jit(**_NOPYTHON)
def _search(
    data, valid, bins, mean, high,
    n_asic_ss, n_asic_fs, min_pix, max_pix, bg_radius, min_snr, max_peaks,
    out_panel, out_ss, out_fs, out_tot, out_maxi, out_snr, out_npix, c_growth,
):
    """Seeds, region growing, local background and acceptance on a (P, H, W) frame.

    data, valid (static mask: good pixels inside the resolution limits), bins: (P, H, W).
    Non-finite pixels are skipped here as if masked. Writes up to max_peaks rows of the out_*
    arrays; returns the number written. ``c_growth`` replaces the breadth-first search by the
    C implementations' growth loop, stale-slot quirk included (validation only).
    """
    P, H, W = data.shape
    ah = H // n_asic_ss
    aw = W // n_asic_fs
    visited = np.zeros((P, H, W), np.uint8)
    q_ss = np.empty(ah * aw, np.int32)
    q_fs = np.empty(ah * aw, np.int32)
    # c_growth: the C code's ASIC-local coordinate buffers, zeroed once per frame and reused
    cbuf_ss = np.zeros(ah * aw + 1, np.int32)
    cbuf_fs = np.zeros(ah * aw + 1, np.int32)
    ring = 2 * bg_radius
    ring2 = ring * ring
    tmin = np.inf
    for b in range(high.size):
        if high[b] < tmin:
            tmin = high[b]
    count = 0
    for p in range(P):
        for ai in range(n_asic_ss):
            s0 = ai * ah
            s1 = s0 + ah
            for aj in range(n_asic_fs):
                f0 = aj * aw
                f1 = f0 + aw
                for ss in range(s0 + 1, s1 - 1):
                    for fs in range(f0 + 1, f1 - 1):
                        v = data[p, ss, fs]
                        if not v > tmin:  # cheap pre-filter: below every bin's threshold
                            continue
                        if not v > high[bins[p, ss, fs]]:
                            continue
                        if visited[p, ss, fs] or not valid[p, ss, fs] or v == np.inf:
                            continue
                        if c_growth:
                            n = _c_growth(data, valid, bins, high, p, ss, fs, s0, f0, ah, aw,
                                          visited, cbuf_ss, cbuf_fs, q_ss, q_fs)
                            head = n
                        else:
                            # ---- region growing (breadth first) inside the ASIC
                            visited[p, ss, fs] = 1
                            q_ss[0] = ss
                            q_fs[0] = fs
                            n = 1
                            head = 0
                        while head < n:
                            cs = q_ss[head]
                            cf = q_fs[head]
                            head += 1
                            for ds in range(-1, 2):
                                y = cs + ds
                                if y < s0 or y >= s1:
                                    continue
                                for df in range(-1, 2):
                                    x = cf + df
                                    if x < f0 or x >= f1:
                                        continue
                                    if visited[p, y, x] or not valid[p, y, x]:
                                        continue
                                    v = data[p, y, x]
                                    if v > high[bins[p, y, x]] and v != np.inf:
                                        visited[p, y, x] = 1
                                        q_ss[n] = y
                                        q_fs[n] = x
                                        n += 1
                        if n < min_pix or n > max_pix:
                            continue
                        # ---- first centroid, weights v - radial mean
                        wsum = 0.0
                        wss = 0.0
                        wfs = 0.0
                        for k in range(n):
                            y = q_ss[k]
                            x = q_fs[k]
                            w = data[p, y, x] - mean[bins[p, y, x]]
                            wsum += w
                            wss += w * y
                            wfs += w * x
                        if abs(wsum) < 1e-10:
                            continue
                        c_ss = int(np.rint(wss / abs(wsum)))
                        c_fs = int(np.rint(wfs / abs(wsum)))
                        # ---- local background in the 2R disk
                        nb = 0
                        b1 = 0.0
                        b2 = 0.0
                        bgmax = 0.0
                        for ds in range(-ring, ring):
                            y = c_ss + ds
                            if y < s0 or y >= s1:
                                continue
                            for df in range(-ring, ring):
                                x = c_fs + df
                                if x < f0 or x >= f1:
                                    continue
                                if ds * ds + df * df > ring2:
                                    continue
                                if visited[p, y, x] or not valid[p, y, x]:
                                    continue
                                v = np.float64(data[p, y, x])
                                if v < high[bins[p, y, x]] and v != -np.inf:
                                    nb += 1
                                    b1 += v
                                    b2 += v * v
                                    if v > bgmax:
                                        bgmax = v
                        if nb > 0:
                            loc_mean = b1 / nb
                            var = b2 / nb - loc_mean * loc_mean
                            loc_sd = np.sqrt(var) if var > 0.0 else 0.01
                        else:
                            y = min(max(c_ss, s0), s1 - 1)
                            x = min(max(c_fs, f0), f1 - 1)
                            loc_mean = mean[bins[p, y, x]]
                            loc_sd = 0.01
                        # ---- integration and raw-intensity centroid
                        tot = 0.0
                        raw = 0.0
                        rss = 0.0
                        rfs = 0.0
                        maxi = 0.0
                        for k in range(n):
                            y = q_ss[k]
                            x = q_fs[k]
                            v = np.float64(data[p, y, x])
                            tot += v - loc_mean
                            raw += v
                            rss += v * y
                            rfs += v * x
                            if v - loc_mean > maxi:
                                maxi = v - loc_mean
                        if abs(raw) < 1e-10:
                            continue
                        com_ss = rss / abs(raw)
                        com_fs = rfs / abs(raw)
                        snr = tot / loc_sd if abs(loc_sd) > 1e-10 else 0.0
                        if snr < min_snr:
                            continue
                        if maxi < bgmax - loc_mean:
                            continue
                        if com_fs < f0 or com_fs > f1 - 1 or com_ss < s0 or com_ss > s1 - 1:
                            continue
                        out_panel[count] = p
                        out_ss[count] = com_ss
                        out_fs[count] = com_fs
                        out_tot[count] = tot
                        out_maxi[count] = maxi
                        out_snr[count] = snr
                        out_npix[count] = n
                        count += 1
                        if count >= max_peaks:
                            return count
    return count


# --------------------------------------------------------------------------- Python API
def _as_stack(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3:
        return a
    raise ValueError(f"{name}: expected a (P, H, W) stack or a 2-D array, got shape {a.shape}")


def radial_thresholds(
    data: np.ndarray,
    radius: np.ndarray,
    mask: Optional[np.ndarray] = None,
    params: Optional[Peakfinder8Params] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 alone: (radial mean, high threshold) per ``rint(r)`` bin, float64 arrays."""
    pf = Peakfinder8(radius, mask, params or Peakfinder8Params())
    return pf.radial_thresholds(data)


class Peakfinder8:
    """peakfinder8 for many frames of one detector: mask, resolution limits and the radius
    binning are prepared once.

    Parameters
    ----------
    radius:
        Distance of each pixel from the beam, in pixels: (P, H, W) or 2-D (one module).
    mask:
        Same shape, nonzero = good pixel; None: all good.
    params:
        :class:`Peakfinder8Params` (e.g. ``peaknet.findpeaks.preset("lcls_cspad")``).
    emulate_c_growth:
        Validation only: grow regions with the C code's loop, whose stale-slot quirk can attach
        unconnected pixels to a region (see :func:`_c_growth`). With it, peaknet reproduces
        psana's peak lists; without it (the default) regions are the 8-connected components.

    Call the object with a frame of the radius map's shape (any real dtype; NaN/inf pixels are
    treated as masked) to get its :class:`PeakList`.
    """

    def __init__(
        self,
        radius: np.ndarray,
        mask: Optional[np.ndarray] = None,
        params: Optional[Peakfinder8Params] = None,
        *,
        emulate_c_growth: bool = False,
    ):
        self.emulate_c_growth = bool(emulate_c_growth)
        self.params = params if params is not None else Peakfinder8Params()
        self.params.validate()
        r = _as_stack(np.asarray(radius), "radius")
        if r.dtype.kind != "f":
            r = r.astype(np.float64)
        self.shape = r.shape
        P, H, W = r.shape
        ns, nf = self.params.asics_ss, self.params.asics_fs
        if H % ns or W % nf:
            raise ValueError(
                f"asics_ss/asics_fs: a module of {H} x {W} pixels does not split into "
                f"{ns} x {nf} ASICs"
            )
        if H // ns < 3 or W // nf < 3:
            raise ValueError(
                f"asics_ss/asics_fs: ASICs of {H // ns} x {W // nf} pixels are too small"
            )
        if mask is None:
            m = np.ones(1, np.uint8)  # broadcast flag: all good
        else:
            m = _as_stack(np.asarray(mask), "mask")
            if m.shape != r.shape:
                raise ValueError(f"mask: shape {m.shape} differs from the radius map's {r.shape}")
            if m.dtype == np.bool_:
                m = m.view(np.uint8)
        max_res = np.inf if self.params.max_res is None else float(self.params.max_res)
        self._static_valid = np.empty(r.shape, np.uint8)
        self._bins = np.empty(r.shape, np.int32)
        ok = _static_pixels(
            np.ascontiguousarray(r).reshape(-1), np.ascontiguousarray(m).reshape(-1),
            float(self.params.min_res), max_res,
            self._static_valid.reshape(-1), self._bins.reshape(-1),
        )
        if not ok:
            raise ValueError("radius: negative distances from the beam")
        # valid pixels grouped by bin (raster order inside a bin), for the radial statistics
        self._pos, self._starts = _group_by_bin(
            self._bins.reshape(-1), self._static_valid.reshape(-1)
        )
        self._max_pix = (
            H * W + 1 if self.params.max_pix_count is None else int(self.params.max_pix_count)
        )

    def _prepare(self, data: np.ndarray) -> np.ndarray:
        d = _as_stack(np.asarray(data), "data")
        if d.shape != self.shape:
            raise ValueError(f"data: shape {d.shape} differs from the radius map's {self.shape}")
        if d.dtype != np.float32 or not d.flags.c_contiguous:
            d = np.ascontiguousarray(d, dtype=np.float32)
        return d

    def radial_thresholds(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(radial mean, high threshold) per ``rint(r)`` bin of this frame, float64 arrays."""
        d = self._prepare(data)
        return _radial_stats(
            d.reshape(-1), self._pos, self._starts,
            float(self.params.adc_thresh), float(self.params.min_snr), N_ITERATIONS,
        )

    def __call__(self, data: np.ndarray) -> PeakList:
        prm = self.params
        d = self._prepare(data)
        mean, high = _radial_stats(
            d.reshape(-1), self._pos, self._starts,
            float(prm.adc_thresh), float(prm.min_snr), N_ITERATIONS,
        )
        k = int(prm.max_num_peaks)
        panel = np.empty(k, np.int32)
        ss = np.empty(k, np.float64)
        fs = np.empty(k, np.float64)
        tot = np.empty(k, np.float64)
        maxi = np.empty(k, np.float64)
        snr = np.empty(k, np.float64)
        npix = np.empty(k, np.int32)
        n = _search(
            d, self._static_valid, self._bins, mean, high,
            prm.asics_ss, prm.asics_fs, int(prm.min_pix_count), self._max_pix,
            int(prm.local_bg_radius), float(prm.min_snr), k,
            panel, ss, fs, tot, maxi, snr, npix, self.emulate_c_growth,
        )
        return PeakList(
            panel=panel[:n], ss=ss[:n], fs=fs[:n], intensity=tot[:n],
            max_value=maxi[:n], snr=snr[:n], npix=npix[:n],
        )


def peakfinder8(
    data: np.ndarray,
    radius: np.ndarray,
    mask: Optional[np.ndarray] = None,
    params: Optional[Peakfinder8Params] = None,
    **overrides,
) -> PeakList:
    """Find the peaks of one frame (see the module docstring).

    ``peakfinder8(stack, radius, mask, preset("lcls_cspad"))`` or with keyword values,
    ``peakfinder8(stack, radius, mask, adc_thresh=100, min_snr=6, ...)``. For many frames build a
    :class:`Peakfinder8` once.
    """
    prm = params if params is not None else Peakfinder8Params()
    if overrides:
        prm = prm.replace(**overrides)
    return Peakfinder8(radius, mask, prm)(data)
