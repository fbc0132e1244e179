"""Model output -> peak lists: segmentation mask, connected components, peak measurements.

Steps (all batched over frames and panels; no Python loop over pixels or peaks):

1. :func:`segment`: logits or probabilities (..., C, H, W) -> boolean peak mask (..., H, W), by
   argmax (ties go to background) or by thresholding the peak-class probability.
2. :func:`label_components`: 8-connected components inside each (H, W) slice, numbered 1..n across
   the whole batch. CPU: ``scipy.ndimage.label`` on the (N, H, W) block with a structure that does
   not connect slices. GPU (optional, ``backend="torch"``): iterative max-label propagation with
   3x3 max-pooling until nothing changes, then renumbering with ``torch.unique``.
3. :func:`measure_components`: per component, with I the input frame (ADU):

   - local background ``bg`` = median of the *ring* pixels: good pixels that belong to no
     component and whose Euclidean distance to the nearest component pixel ``d`` satisfies
     ``r_in < d <= r_out`` (defaults 2 and 5 px), assigned to that nearest component;
   - ``sigma`` = standard deviation of the same ring pixels;
   - ``npix`` = pixels in the component;
   - ``intensity`` = sum(I - bg) over the component;
   - ``max_value`` = max(I) - bg;
   - centroid (ss, fs) = mean of the pixel centres weighted by max(I - bg, 0); the unweighted
     mean when those weights sum to 0;
   - ``snr`` = intensity / sigma (peakfinder8's definition, so values compare with Cheetah/OM
     ``peakSNR``); 0 when the ring has fewer than 2 pixels; sigma is floored at 0.01 ADU
     (peakfinder8's value for an undefined local std).

   Components without a ring get bg = 0.
4. :func:`decode_peaks`: the above, returning one :class:`peaknet.peaks.PeakList` per frame.
   Stack layout ((B, P, C, H, W) logits of per-panel crops): ``panel`` = crop (module) index,
   ss/fs module-local. Image layout ((B, C, H, W) assembled frames): ``panel`` = 0 and ss/fs are
   image coordinates, unless ``index_maps`` (the assembled image's panel/ss/fs maps) are given,
   in which case peaks are reported in module coordinates.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from peaknet.peaks import PeakList

ArrayLike = Union[np.ndarray, torch.Tensor]

#: 8-connectivity within a slice, no connection between slices of an (N, H, W) block.
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def segment(
    output: torch.Tensor,
    threshold: Optional[float] = None,
    from_probs: bool = False,
    peak_class: int = 1,
) -> torch.Tensor:
    """Class scores -> peak mask.

    Parameters
    ----------
    output:
        (..., C, H, W) logits (or probabilities with ``from_probs=True``), any float dtype.
    threshold:
        ``None``: a pixel is a peak where ``argmax`` over C is ``peak_class`` (the first maximum
        wins ties, so a tie with class 0 is background). A float: where the peak-class
        probability (softmax of the logits, or the given probability) is >= threshold.
    peak_class:
        Index of the peak class (1).

    Returns a bool tensor (..., H, W) on the same device.
    """
    output = torch.as_tensor(output)
    c = output.shape[-3]
    target = output.select(-3, peak_class)
    if threshold is None:
        # argmax == peak_class with the first maximum winning ties, without a strided argmax
        # (slow on CPU): strictly above every earlier class, at least every later one.
        out = torch.ones_like(target, dtype=torch.bool)
        if peak_class > 0:
            out &= target > output.narrow(-3, 0, peak_class).amax(dim=-3)
        if peak_class < c - 1:
            out &= target >= output.narrow(-3, peak_class + 1, c - peak_class - 1).amax(dim=-3)
        return out
    if from_probs:
        return target.float() >= threshold
    if c == 2:
        other = output.select(-3, 1 - peak_class)
        return torch.sigmoid(target.float() - other.float()) >= threshold
    return torch.softmax(output.float(), dim=-3).select(-3, peak_class) >= threshold


def _label_torch(mask: torch.Tensor, max_iter: int = 4096, check_every: int = 8):
    """(N, H, W) bool tensor -> ((N, H, W) int64 labels 1..n (0 = background), n) or None if it
    did not converge in ``max_iter`` propagation steps."""
    n_, h, w = mask.shape
    exact = h * w < 2**24
    dtype = torch.float32 if exact else torch.float64
    idx = torch.arange(1, h * w + 1, device=mask.device, dtype=dtype).reshape(1, 1, h, w)
    m = mask.unsqueeze(1)
    lab = torch.where(m, idx.expand(n_, 1, h, w), torch.zeros((), dtype=dtype, device=mask.device))
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    converged = False
    it = 0
    while it < max_iter:
        prev = lab
        for _ in range(check_every):
            lab = torch.where(m, F.max_pool2d(lab, 3, stride=1, padding=1), zero)
        it += check_every
        if torch.equal(lab, prev):
            converged = True
            break
    if not converged:
        return None
    lab = lab.squeeze(1).to(torch.int64)
    key = lab + torch.arange(n_, device=mask.device).view(n_, 1, 1) * (h * w + 1)
    keys = key[mask]
    uniq, inv = torch.unique(keys, return_inverse=True)
    out = torch.zeros((n_, h, w), dtype=torch.int64, device=mask.device)
    out[mask] = inv + 1
    return out, int(uniq.numel())


def label_components(
    mask: ArrayLike, backend: Literal["auto", "scipy", "torch"] = "auto"
) -> tuple[np.ndarray, int]:
    """8-connected components of each (H, W) slice of ``mask``.

    Parameters
    ----------
    mask:
        (..., H, W) bool array or tensor; leading dims are independent slices.
    backend:
        ``"scipy"`` (CPU), ``"torch"`` (label propagation on the tensor's device; falls back to
        scipy for components too long to converge in 4096 steps), ``"auto"``: torch for CUDA
        tensors, scipy otherwise.

    Returns (labels, n): labels int32 numpy array of mask's shape, 0 = background, 1..n numbered
    across all slices (component k lies in exactly one slice). The numbering order differs
    between backends; the partition does not.
    """
    shape = tuple(mask.shape)
    h, w = shape[-2:]
    use_torch = backend == "torch" or (
        backend == "auto" and isinstance(mask, torch.Tensor) and mask.is_cuda
    )
    if use_torch:
        m = torch.as_tensor(mask).to(torch.bool).reshape(-1, h, w)
        res = _label_torch(m)
        if res is not None:
            lab, n = res
            return lab.cpu().numpy().astype(np.int32).reshape(shape), n
    m = _np(mask).astype(bool).reshape(-1, h, w)
    lab, n = ndimage.label(m, structure=_STRUCTURE_3D, output=np.int32)
    return lab.reshape(shape), int(n)


def _grouped_median(values: np.ndarray, groups: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Median of ``values`` per group id in [0, n); returns (median (n,), count (n,)); groups with
    no values get NaN."""
    order = np.lexsort((values, groups))
    v = values[order]
    g = groups[order]
    count = np.bincount(g, minlength=n)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    med = np.full(n, np.nan)
    has = count > 0
    lo = start[has] + (count[has] - 1) // 2
    hi = start[has] + count[has] // 2
    med[has] = 0.5 * (v[lo].astype(np.float64) + v[hi].astype(np.float64))
    return med, count


def _disk_offsets(r_out: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = int(np.floor(r_out))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    d = np.sqrt(dy**2 + dx**2)
    keep = d <= r_out
    return dy[keep], dx[keep], d[keep]


def measure_components(
    labels: np.ndarray,
    n: int,
    frames: ArrayLike,
    good: Optional[ArrayLike] = None,
    ring: tuple[float, float] = (2.0, 5.0),
) -> dict[str, np.ndarray]:
    """Measure labelled components (see the module docstring for definitions).

    Parameters
    ----------
    labels:
        (N, H, W) int labels from :func:`label_components` (0 = background, 1..n).
    n:
        Number of components.
    frames:
        (N, H, W) detector values (ADU), same layout as labels.
    good:
        Optional (N, H, W) bool, True = good pixel (bad pixels never enter the ring).
    ring:
        (r_in, r_out) in pixels: the background ring is r_in < d <= r_out from the component.

    Returns a dict of (n,) arrays for components 1..n: ``slice`` (int64 index into N), ``ss``,
    ``fs`` (float64 pixel-centre coordinates), ``intensity``, ``max_value``, ``snr``,
    ``background``, ``sigma`` (float64, ADU), ``npix`` (int64).
    """
    labels = np.asarray(labels)
    nsl, h, w = labels.shape
    img = _np(frames).reshape(nsl, h, w)
    flat_lab = labels.reshape(-1)
    pix = np.flatnonzero(flat_lab)
    lab = flat_lab[pix].astype(np.int64) - 1  # 0-based component id
    vals = img.reshape(-1)[pix].astype(np.float64)
    s_idx, rem = np.divmod(pix, h * w)
    yy, xx = np.divmod(rem, w)

    # --- ring: nearest-component distance via disk offsets around every component pixel ----
    dy, dx, dd = _disk_offsets(ring[1])
    cy = (yy[:, None] + dy[None, :]).reshape(-1)
    cx = (xx[:, None] + dx[None, :]).reshape(-1)
    cd = np.broadcast_to(dd[None, :], (pix.size, dd.size)).reshape(-1)
    cl = np.broadcast_to(lab[:, None], (pix.size, dd.size)).reshape(-1)
    cs = np.broadcast_to(s_idx[:, None], (pix.size, dd.size)).reshape(-1)
    inb = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
    ckey = (cs * (h * w) + cy * w + cx)[inb]
    cd, cl = cd[inb], cl[inb]
    order = np.lexsort((cd, ckey))  # by pixel, then by distance
    ckey, cd, cl = ckey[order], cd[order], cl[order]
    first = np.ones(ckey.size, dtype=bool)
    first[1:] = ckey[1:] != ckey[:-1]
    rkey, rd, rl = ckey[first], cd[first], cl[first]  # nearest component per candidate pixel
    sel = rd > ring[0]  # excludes component pixels (d = 0) and the gap
    if good is not None:
        sel &= _np(good).astype(bool).reshape(-1)[rkey]
    rkey, rl = rkey[sel], rl[sel]
    rvals = img.reshape(-1)[rkey].astype(np.float64)
    sel = np.isfinite(rvals)
    rvals, rl = rvals[sel], rl[sel]
    bg, rcount = _grouped_median(rvals, rl, n)
    rsum = np.bincount(rl, weights=rvals, minlength=n)
    rsum2 = np.bincount(rl, weights=rvals * rvals, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        rmean = rsum / np.maximum(rcount, 1)
        sigma = np.sqrt(np.maximum(rsum2 / np.maximum(rcount, 1) - rmean**2, 0.0))
    bg = np.where(rcount > 0, bg, 0.0)
    sigma = np.where(rcount >= 2, np.maximum(sigma, 0.01), np.nan)

    # --- component sums ------------------------------------------------------------------
    npix = np.bincount(lab, minlength=n)
    sub = vals - bg[lab]
    intensity = np.bincount(lab, weights=sub, minlength=n)
    maxv = np.full(n, -np.inf)
    np.maximum.at(maxv, lab, vals)
    max_value = maxv - bg
    wgt = np.maximum(sub, 0.0)
    wsum = np.bincount(lab, weights=wgt, minlength=n)
    use_w = wsum > 0
    wsel = np.where(use_w[lab], wgt, 1.0)
    norm = np.bincount(lab, weights=wsel, minlength=n)
    ss = np.bincount(lab, weights=wsel * yy, minlength=n) / np.maximum(norm, 1e-300)
    fs = np.bincount(lab, weights=wsel * xx, minlength=n) / np.maximum(norm, 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(rcount >= 2, intensity / sigma, 0.0)
    sl = np.zeros(n, dtype=np.int64)
    sl[lab] = s_idx
    return {
        "slice": sl, "ss": ss, "fs": fs, "intensity": intensity, "max_value": max_value,
        "snr": snr, "background": bg, "sigma": sigma, "npix": npix.astype(np.int64),
    }


def decode_peaks(
    output: torch.Tensor,
    frames: ArrayLike,
    mask: Optional[ArrayLike] = None,
    layout: Literal["image", "stack"] = "image",
    threshold: Optional[float] = None,
    from_probs: bool = False,
    min_pix: int = 1,
    max_pix: Optional[int] = None,
    ring: tuple[float, float] = (2.0, 5.0),
    backend: Literal["auto", "scipy", "torch"] = "auto",
    index_maps: Optional[Sequence[ArrayLike]] = None,
) -> list[PeakList]:
    """Model output -> one :class:`PeakList` per frame.

    Parameters
    ----------
    output:
        Logits (or probabilities, ``from_probs=True``) at the frames' resolution (map canvas
        outputs back first: ``PadCrop.restore`` / ``PanelBatch.split``). ``layout="image"``:
        (B, C, H, W) or (C, H, W). ``layout="stack"``: (B, P, C, H, W) or (P, C, H, W).
    frames:
        The raw detector values (ADU) the peaks are measured on: (B, H, W)/(H, W) for images,
        (B, P, H, W)/(P, H, W) for stacks (numpy or torch).
    mask:
        Optional good-pixel mask broadcastable to frames (True/1 = good); bad pixels (and
        non-finite frame values) are removed from the peak mask and from the background rings.
    threshold, from_probs:
        See :func:`segment`.
    min_pix, max_pix:
        Keep components with min_pix <= npix (<= max_pix).
    ring:
        (r_in, r_out) of the background ring, pixels.
    backend:
        Connected components backend (see :func:`label_components`).
    index_maps:
        Image layout only: (panel_map, ss_map, fs_map), each (H, W), giving for every assembled
        pixel its module index (< 0 in gaps) and module coordinates. Peaks are then reported as
        module index of their brightest pixel and the weighted mean of the maps' ss/fs over their
        pixels (a component never spans modules when gaps are masked out).

    Returns a list of B PeakLists (float32 columns, see :class:`peaknet.peaks.PeakList`).
    """
    out = torch.as_tensor(output)
    fr = frames if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if layout == "image":
        if out.dim() == 3:
            out = out.unsqueeze(0)
        b, h, w = out.shape[0], out.shape[-2], out.shape[-1]
        p = 1
    elif layout == "stack":
        if out.dim() == 4:
            out = out.unsqueeze(0)
        b, p, h, w = out.shape[0], out.shape[1], out.shape[-2], out.shape[-1]
    else:
        raise ValueError(f"layout must be 'image' or 'stack', got {layout!r}")
    pk = segment(out, threshold, from_probs).reshape(b * p, h, w)
    fr_np = _np(fr).reshape(b * p, h, w)
    good = np.isfinite(fr_np)
    if mask is not None:
        good &= np.broadcast_to(_np(mask).astype(bool), _np(fr).shape).reshape(b * p, h, w)
    if not good.all():
        pk = pk & torch.from_numpy(good).to(pk.device)
    labels, n = label_components(pk, backend)
    m = measure_components(labels, n, fr_np, good, ring)
    keep = m["npix"] >= min_pix
    if max_pix is not None:
        keep &= m["npix"] <= max_pix
    m = {k: v[keep] for k, v in m.items()}
    frame_of = m["slice"] // p
    panel = m["slice"] % p
    ss, fs = m["ss"], m["fs"]
    if index_maps is not None:
        if layout != "image":
            raise ValueError("index_maps apply to the image layout only")
        pmap, smap, fmap = (np.asarray(a) for a in index_maps)
        ss, fs, panel = _to_modules(labels, keep, fr_np, good, pmap, smap, fmap, m)
    order = np.lexsort((fs, ss, panel, frame_of))
    bounds = np.searchsorted(frame_of[order], np.arange(b + 1))
    lists = []
    for i in range(b):  # one PeakList per frame (not per pixel)
        rows = order[bounds[i] : bounds[i + 1]]
        lists.append(PeakList(
            panel=panel[rows], ss=ss[rows], fs=fs[rows], intensity=m["intensity"][rows],
            max_value=m["max_value"][rows], snr=m["snr"][rows], npix=m["npix"][rows],
        ))
    return lists


def _to_modules(labels, keep, frames, good, pmap, smap, fmap, m):
    """Image-layout components -> (ss, fs, panel) in module coordinates via index maps."""
    nsl, h, w = labels.shape
    ids = np.flatnonzero(keep)  # 0-based ids of kept components
    remap = np.full(keep.size + 1, -1, dtype=np.int64)
    remap[ids + 1] = np.arange(ids.size)
    flat = labels.reshape(-1)
    pix = np.flatnonzero(flat)
    k = remap[flat[pix]]
    sel = k >= 0
    pix, k = pix[sel], k[sel]
    rem = pix % (h * w)
    vals = frames.reshape(-1)[pix].astype(np.float64)
    wgt = np.maximum(vals - m["background"][k], 0.0)
    nk = ids.size
    wsum = np.bincount(k, weights=wgt, minlength=nk)
    wgt = np.where((wsum > 0)[k], wgt, 1.0)
    norm = np.maximum(np.bincount(k, weights=wgt, minlength=nk), 1e-300)
    sm, fm, pm = smap.reshape(-1)[rem], fmap.reshape(-1)[rem], pmap.reshape(-1)[rem]
    ss = np.bincount(k, weights=wgt * sm, minlength=nk) / norm
    fs = np.bincount(k, weights=wgt * fm, minlength=nk) / norm
    # module of the brightest pixel: sort by (component, value), take the last of each group
    order = np.lexsort((vals, k))
    last = np.ones(order.size, dtype=bool)
    last[:-1] = k[order][1:] != k[order][:-1]
    panel = np.full(nk, -1, dtype=np.int64)
    panel[k[order][last]] = pm[order][last]
    return ss, fs, panel
