"""Batched Levenberg-Marquardt fits of thousands of pseudo-Voigt windows at once (torch).

Same objective as the lmfit reference (:mod:`peaknet.label.fit_lmfit`): residuals
``w (model - data)`` with ``w = 1/sqrt(max(I, 0) + 1)`` (0 on masked pixels), data and ``I`` in
photons (data / ``adu_per_photon``; A, a, b, c are returned in ADU), minimised in
lmfit's internal coordinates (its MINUIT-style sin/sqrt bound transform, see
:mod:`peaknet.label.pvoigt`), from the same initial guesses. With the same parameterisation the
minima coincide; so that the solver also lands in the *same* minimum as lmfit where the
landscape has several (weak or odd peaks), it follows MINPACK's ``lmdif`` (what
``lmfit.minimize(method="leastsq")`` runs through ``scipy.optimize.leastsq``) step for step,
for every window at once:

- trust region on the scaled step, ``||D p|| <= delta``, ``D`` the running maximum of the
  Jacobian's column norms, ``delta = 100 ||D u||`` at the start (factor 100);
- the Levenberg-Marquardt parameter from MINPACK's ``lmpar``: the Gauss-Newton step if it fits
  in the region, otherwise safeguarded Newton iterations on ``||D p|| - delta`` (at most 10,
  stopping within 10% of delta), continuing from the previous parameter;
- MINPACK's ratio tests, radius updates, acceptance at ratio >= 1e-4 and convergence codes:
  1 (ftol on actual and predicted relative reduction), 2 (xtol on delta / ||D u||), 3 (both),
  4 (zero gradient), 5 (evaluation limit), 6-8 (tolerances below machine precision).

Differences from lmfit, none of which moves a minimum: the Jacobian is analytic (lmfit uses
forward differences, step 1e-5 |u|); ``lmpar``'s linear algebra is a Cholesky factorisation of
the scaled normal matrix ``D^-1 J^T J D^-1 + par I`` instead of a pivoted QR of J (the same
iterates in exact arithmetic; a Jacobian whose normal matrix is not positive definite counts as
rank-deficient); ``nfev`` counts residual evaluations plus 11 per Jacobian, as lmdif does.

Restarts (``cfg.restart_nfev``, as in the lmfit reference): a window still running after that
many evaluations starts a fresh lmdif from its current values (round-tripped through the
external values, as a new ``lmfit.minimize`` call would), which resets MINPACK's scaling.

Scheduling: a working set of at most ``cfg.batch_size`` windows advances one MINPACK inner
iteration per pass (Jacobians only for the windows whose last step was accepted); finished
windows leave it and waiting windows take their place, so no pass is spent on a few stragglers
while others wait. float64 throughout, on the CPU or CUDA (``cfg.device``).
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from .config import LabelFitConfig
from .pvoigt import BOTH, LOWER, NPARAMS, UPPER, WindowFits, bound_kinds, initial_guess, param_bounds, \
    pixel_weights, scale_params, to_external, to_internal, window_gains

_EPS = float(np.finfo(np.float64).eps)
_DWARF = float(np.finfo(np.float64).tiny)
_FACTOR = 100.0
_K = 11


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU. ``"cuda"`` without CUDA raises RuntimeError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(device)


class _Model:
    """Weighted residuals and their Jacobian in lmfit's internal coordinates (torch)."""

    def __init__(self, window: int, lo: np.ndarray, hi: np.ndarray, device: torch.device):
        dt = torch.float64
        yy, xx = torch.meshgrid(torch.arange(window, dtype=dt), torch.arange(window, dtype=dt),
                                indexing="ij")
        self.y = yy.reshape(-1).to(device)
        self.x = xx.reshape(-1).to(device)
        self.m = window * window
        kind = torch.as_tensor(bound_kinds(lo, hi), device=device)
        self.lo = torch.as_tensor(np.where(np.isfinite(lo), lo, 0.0), dtype=dt, device=device)
        self.hi = torch.as_tensor(np.where(np.isfinite(hi), hi, 1.0), dtype=dt, device=device)
        self.is_both, self.is_lower, self.is_upper = kind == BOTH, kind == LOWER, kind == UPPER
        self.half = (self.hi - self.lo) / 2.0

    def external(self, u: torch.Tensor) -> torch.Tensor:
        root = torch.sqrt(u * u + 1.0)
        return torch.where(self.is_both, self.lo + (torch.sin(u) + 1.0) * self.half,
                           torch.where(self.is_lower, self.lo - 1.0 + root,
                                       torch.where(self.is_upper, self.hi + 1.0 - root, u)))

    def internal(self, p: torch.Tensor) -> torch.Tensor:
        """External -> internal, as lmfit's ``Parameter.setup_bounds``."""
        both = torch.arcsin(torch.clamp(2.0 * (p - self.lo) / (self.hi - self.lo) - 1.0, -1.0, 1.0))
        lower = torch.sqrt(torch.clamp((p - self.lo + 1.0) ** 2 - 1.0, min=0.0))
        upper = torch.sqrt(torch.clamp((self.hi - p + 1.0) ** 2 - 1.0, min=0.0))
        u = torch.where(self.is_both, both, torch.where(self.is_lower, lower,
                                                        torch.where(self.is_upper, upper, p)))
        return torch.where(u.abs() < 1e-15, torch.zeros_like(u), u)

    def dext(self, u: torch.Tensor) -> torch.Tensor:
        """d external / d internal (n, 11)."""
        root = torch.sqrt(u * u + 1.0)
        return torch.where(self.is_both, torch.cos(u) * self.half,
                           torch.where(self.is_lower, u / root,
                                       torch.where(self.is_upper, -u / root, torch.ones_like(u))))

    def _shape(self, p: torch.Tensor):
        """Gaussian and Lorentzian parts and the offsets (all (n, m))."""
        cy, cx, sy, sx, gy, gx = (p[:, i:i + 1] for i in range(1, 7))
        dy = self.y - cy
        dx = self.x - cx
        dy2, dx2 = dy * dy, dx * dx
        g = torch.exp((dy2 / (sy * sy) + dx2 / (sx * sx)).mul_(-0.5))
        lor = (dy2 / (gy * gy)).add_(dx2 / (gx * gx)).add_(1.0).reciprocal_()
        return dy, dx, dy2, dx2, g, lor

    def residual(self, u: torch.Tensor, data: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        p = self.external(u)
        _, _, _, _, g, lor = self._shape(p)
        A, eta = p[:, 0:1], p[:, 7:8]
        mod = g.mul_(A * (1.0 - eta)).add_(lor.mul_(A * eta))
        mod.add_(p[:, 8:9] * self.y).add_(p[:, 9:10] * self.x).add_(p[:, 10:11]).sub_(data)
        return mod.mul_(w)

    def jacobian(self, u: torch.Tensor, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """(n, 12, m): rows 0-10 the Jacobian of the weighted residuals (transposed), row 11 f.

        ``Jaug @ Jaug.mT`` then holds J^T J, J^T f and f^T f in one batched product.
        """
        n = u.shape[0]
        p = self.external(u)
        s = self.dext(u)
        dy, dx, dy2, dx2, g, lor = self._shape(p)
        A, eta = p[:, 0:1], p[:, 7:8]
        sy, sx, gy, gx = p[:, 3:4], p[:, 4:5], p[:, 5:6], p[:, 6:7]
        out = torch.empty(n, _K + 1, self.m, dtype=u.dtype, device=u.device)
        wg = w * g
        wl = w * lor
        torch.mul(wl, eta * s[:, 0:1], out=out[:, 0]).add_(wg * ((1.0 - eta) * s[:, 0:1]))
        torch.sub(wl, wg, out=out[:, 7]).mul_(A * s[:, 7:8])
        agw = wg.mul_(A * (1.0 - eta))  # A (1 - eta) G w
        alw = wl.mul_(lor).mul_(2.0 * A * eta)  # 2 A eta L^2 w
        ty = agw * dy
        tly = alw * dy
        torch.mul(ty, s[:, 1:2] / (sy * sy), out=out[:, 1]).add_(tly * (s[:, 1:2] / (gy * gy)))
        torch.mul(ty, dy, out=out[:, 3]).mul_(s[:, 3:4] / (sy * sy * sy))
        torch.mul(tly, dy, out=out[:, 5]).mul_(s[:, 5:6] / (gy * gy * gy))
        tx = agw.mul_(dx)
        tlx = alw.mul_(dx)
        torch.mul(tx, s[:, 2:3] / (sx * sx), out=out[:, 2]).add_(tlx * (s[:, 2:3] / (gx * gx)))
        torch.mul(tx, dx, out=out[:, 4]).mul_(s[:, 4:5] / (sx * sx * sx))
        torch.mul(tlx, dx, out=out[:, 6]).mul_(s[:, 6:7] / (gx * gx * gx))
        torch.mul(w, self.y, out=out[:, 8])
        torch.mul(w, self.x, out=out[:, 9])
        out[:, 10] = w
        out[:, 11] = f
        return out


def _bdot(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (M @ v[:, :, None]).squeeze(-1)


def _lmpar(Bs, hs, delta, par, L0, full, z0, zw0):
    """MINPACK's lmpar on the scaled normal equations, for every window at once.

    Bs (n, k, k) = D^-1 J^T J D^-1; hs (n, k) = D^-1 J^T f; delta, par (n,); L0 the Cholesky
    factor of Bs where ``full`` (positive definite); z0 = Bs^-1 hs the scaled Gauss-Newton
    step; zw0 = ||L0^-1 z0||^2 / ||z0||^2. Returns par and the scaled step z = D x, x solving
    (J^T J + par D^2) x = J^T f (the step is p = -x).
    """
    n, k = hs.shape
    dxnorm = torch.where(full, torch.linalg.vector_norm(z0, dim=-1), float("inf"))
    fp = dxnorm - delta
    gn_ok = full & (fp <= 0.1 * delta)
    act = torch.nonzero(~gn_ok).squeeze(1)
    if act.numel() == 0:
        return torch.zeros_like(par), z0
    # the windows whose Gauss-Newton step does not fit: MINPACK's iteration on par
    B, h, dl, f_ = Bs[act], hs[act], delta[act], fp[act]
    fa = full[act]
    pl = torch.where(fa, (f_ / dl) / torch.where(fa, zw0[act], 1.0), 0.0)
    gnorm = torch.linalg.vector_norm(h, dim=-1)
    pu = gnorm / dl
    pu = torch.where(pu == 0, _DWARF / torch.clamp(dl, max=0.1), pu)
    p_ = torch.minimum(torch.maximum(par[act], pl), pu)
    p_ = torch.where(p_ == 0, torch.where(fa, gnorm / dxnorm[act], 0.0), p_)
    eye = torch.eye(k, dtype=hs.dtype, device=hs.device)
    diag_max = torch.diagonal(B, dim1=1, dim2=2).amax(-1)
    zout = torch.empty_like(h)
    pout = torch.empty_like(p_)
    live = torch.arange(act.numel(), device=hs.device)  # rows of act still iterating
    done = torch.zeros_like(fa)
    zz = h
    for it in range(1, 11):
        p_ = torch.where(p_ == 0, torch.clamp(0.001 * pu, min=_DWARF), p_)
        L, info = torch.linalg.cholesky_ex(B + p_[:, None, None] * eye)
        bad = info != 0
        if bool(bad.any()):  # numerically singular even with par: lift par and refactor
            lift = torch.clamp(1e-12 * diag_max, min=_DWARF)
            p_ = torch.where(bad, torch.maximum(p_ * 10.0, lift), p_)
            L, info = torch.linalg.cholesky_ex(B + p_[:, None, None] * eye)
        z_new = torch.cholesky_solve(h[:, :, None], L).squeeze(-1)
        zz = torch.where(done[:, None], zz, z_new)
        if it < 10:
            dxn = torch.linalg.vector_norm(z_new, dim=-1)
            temp = f_
            f_new = dxn - dl
            stop = done | (f_new.abs() <= 0.1 * dl) | ((pl == 0) & (f_new <= temp) & (temp < 0))
            f_ = torch.where(done, f_, f_new)
            done = stop
            ndone = int(done.sum())
        if it == 10 or ndone == done.numel():
            zout[live] = zz
            pout[live] = p_
            break
        if 2 * ndone >= done.numel():  # most are done: drop them from the iteration
            di = torch.nonzero(done).squeeze(1)
            zout[live[di]] = zz[di]
            pout[live[di]] = p_[di]
            go = torch.nonzero(~done).squeeze(1)
            B, h, dl, pl, pu, p_, f_, f_new = B[go], h[go], dl[go], pl[go], pu[go], p_[go], f_[go], f_new[go]
            L, z_new, dxn, zz, diag_max, live = L[go], z_new[go], dxn[go], zz[go], diag_max[go], live[go]
            done = done[go]
        # Newton correction (the windows already done keep their par)
        wv = torch.linalg.solve_triangular(L, (z_new / dxn[:, None])[:, :, None], upper=False)
        parc = (f_new / dl) / (wv * wv).sum(dim=(1, 2))
        pl = torch.where(~done & (f_new > 0), torch.maximum(pl, p_), pl)
        pu = torch.where(~done & (f_new < 0), torch.minimum(pu, p_), pu)
        p_ = torch.where(done, p_, torch.maximum(pl, p_ + parc))
    zz, p_ = zout, pout
    z = torch.where(gn_ok[:, None], z0, 0.0)
    par = torch.zeros_like(par)
    z[act] = zz
    par[act] = p_
    return par, z


_STATE_KEYS = ("ids", "u", "data", "w", "f", "fnorm", "nfev", "first", "need_jac", "par",
               "delta", "xnorm", "gnorm", "diag", "Bs", "hs", "L0", "full", "z0", "zw0", "nfev0")


def _new_state(mdl: _Model, ids, u, data, w):
    n = u.shape[0]
    dev, dt = u.device, u.dtype
    f = mdl.residual(u, data, w)
    z = lambda *s: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
    return dict(
        ids=ids, u=u, data=data, w=w, f=f, fnorm=torch.linalg.vector_norm(f, dim=-1),
        nfev=torch.ones(n, dtype=torch.int64, device=dev),
        first=torch.ones(n, dtype=torch.bool, device=dev),
        need_jac=torch.ones(n, dtype=torch.bool, device=dev),
        par=z(n), delta=z(n), xnorm=z(n), gnorm=z(n), diag=z(n, _K), Bs=z(n, _K, _K), hs=z(n, _K),
        L0=z(n, _K, _K), full=torch.zeros(n, dtype=torch.bool, device=dev), z0=z(n, _K), zw0=z(n),
        nfev0=torch.zeros(n, dtype=torch.int64, device=dev),
    )


def _solve(mdl: _Model, u_all: torch.Tensor, data_all: torch.Tensor, w_all: torch.Tensor,
           cfg: LabelFitConfig):
    """MINPACK lmdif for all windows; returns internal u, chi-square, nfev and info."""
    n = u_all.shape[0]
    dev, dt = u_all.device, u_all.dtype
    ftol, xtol = float(cfg.ftol), float(cfg.xtol)
    maxfev = int(cfg.max_nfev)
    restart = int(cfg.restart_nfev)
    cap = max(1, int(cfg.batch_size))
    out_u = u_all.clone()
    out_chi = torch.zeros(n, dtype=dt, device=dev)
    out_nfev = torch.zeros(n, dtype=torch.int64, device=dev)
    out_info = torch.zeros(n, dtype=torch.int64, device=dev)
    eye = torch.eye(_K, dtype=dt, device=dev)

    nxt = min(n, cap)
    st = _new_state(mdl, torch.arange(nxt, device=dev), u_all[:nxt].clone(), data_all[:nxt],
                    w_all[:nxt])
    while st["ids"].numel() > 0:
        m = st["ids"].numel()
        hold = None  # windows that take no trial step this pass
        pre_info = None  # their info (0: they go on)
        restart_at = None  # (window mask, point) of lmfit-style restarts this pass
        # ---- restarts, emulating lmfit exactly: a run with budget R aborts at MINPACK's call
        # R + 2 (its counter starts after scipy's shape check) and lmfit hands back that call's
        # point. Inside a Jacobian that is a forward-difference point u + h e_j (h = 1e-5 |u_j|).
        jm = st["need_jac"]
        if restart:
            c = st["nfev"] - st["nfev0"]  # calls of the current run
            abort_j = jm & (c + _K >= restart + 2)
            if bool(abort_j.any()):
                j = torch.clamp(restart + 1 - c, 0, _K - 1)
                uu = st["u"]
                uj = uu.gather(1, j[:, None]).squeeze(1)
                h = 1e-5 * uj.abs()
                h = torch.where(h == 0, 1e-5, h)
                fd = uu.scatter(1, j[:, None], (uj + h)[:, None])
                restart_at = (abort_j, fd)
                hold = abort_j
                pre_info = torch.zeros(m, dtype=torch.int64, device=dev)
                jm = jm & ~abort_j
        # ---- outer iteration (after a successful step): Jacobian, scaling, factorisation.
        # MINPACK's gtol test (info 4) is gnorm <= gtol = 0: only an exactly zero gradient.
        nj = int(jm.sum())
        if nj:
            sel = slice(None) if nj == m else torch.nonzero(jm).squeeze(1)
            uj = st["u"][sel]
            fj = st["f"][sel]
            Ja = mdl.jacobian(uj, st["w"][sel], fj)
            G = Ja @ Ja.mT  # [[J^T J, J^T f], [f^T J, f^T f]]
            JtJ = G[:, :_K, :_K]
            Jtf = G[:, :_K, _K]
            colnorm = torch.diagonal(JtJ, dim1=1, dim2=2).clamp(min=0.0).sqrt()
            first = st["first"][sel]
            diag0 = torch.where(first[:, None], torch.where(colnorm == 0, 1.0, colnorm),
                                st["diag"][sel])
            xn = torch.linalg.vector_norm(diag0 * uj, dim=-1)
            dl = _FACTOR * xn
            dl = torch.where(dl == 0, _FACTOR, dl)
            st["xnorm"][sel] = torch.where(first, xn, st["xnorm"][sel])
            st["delta"][sel] = torch.where(first, dl, st["delta"][sel])
            fn = st["fnorm"][sel]
            gn = ((Jtf / torch.where(fn > 0, fn, 1.0)[:, None]).abs()
                  / torch.where(colnorm > 0, colnorm, 1.0)).amax(dim=-1)
            st["gnorm"][sel] = gn
            diag = torch.maximum(diag0, colnorm)
            st["diag"][sel] = diag
            Bs = JtJ / (diag[:, :, None] * diag[:, None, :])
            hs = Jtf / diag
            L0, cinfo = torch.linalg.cholesky_ex(Bs)
            z0 = torch.cholesky_solve(hs[:, :, None], L0).squeeze(-1)
            z0n = torch.linalg.vector_norm(z0, dim=-1)
            full = (cinfo == 0) & torch.isfinite(z0n) & (z0n > 0)
            L0 = torch.where(full[:, None, None], L0, eye)
            z0 = torch.where(full[:, None], z0, 0.0)
            wv = torch.linalg.solve_triangular(
                L0, (z0 / torch.where(full, z0n, 1.0)[:, None])[:, :, None], upper=False)
            st["Bs"][sel], st["hs"][sel], st["L0"][sel] = Bs, hs, L0
            st["full"][sel], st["z0"][sel] = full, z0
            st["zw0"][sel] = (wv * wv).sum(dim=(1, 2))
            st["nfev"][sel] += _K
            st["need_jac"][sel] = False
            zero_grad = gn <= 0.0
            if bool(zero_grad.any()):
                zg = torch.zeros(m, dtype=torch.bool, device=dev)
                zg[sel] = zero_grad
                hold = zg if hold is None else (hold | zg)
                pre_info = torch.zeros(m, dtype=torch.int64, device=dev) if pre_info is None \
                    else pre_info
                pre_info = torch.where(zg, 4, pre_info)

        # ---- inner iteration: LM parameter, trial step, ratio tests
        par, zst = _lmpar(st["Bs"], st["hs"], st["delta"], st["par"], st["L0"], st["full"],
                          st["z0"], st["zw0"])
        pnorm = torch.linalg.vector_norm(zst, dim=-1)
        first = st["first"]
        delta = torch.where(first, torch.minimum(st["delta"], pnorm), st["delta"])
        u_try = st["u"] - zst / st["diag"]
        if restart:  # the trial would be call R + 2 of its run: lmfit stops there
            abort_t = (st["nfev"] - st["nfev0"] >= restart + 1)
            if hold is not None:
                abort_t = abort_t & ~hold
            if bool(abort_t.any()):
                if restart_at is None:
                    restart_at = (abort_t, u_try)
                else:
                    restart_at = (restart_at[0] | abort_t,
                                  torch.where(abort_t[:, None], u_try, restart_at[1]))
                hold = abort_t if hold is None else (hold | abort_t)
                pre_info = torch.zeros(m, dtype=torch.int64, device=dev) if pre_info is None \
                    else pre_info
        f1 = mdl.residual(u_try, st["data"], st["w"])
        fnorm1 = torch.linalg.vector_norm(f1, dim=-1)
        fnorm = st["fnorm"]
        fsafe = torch.where(fnorm > 0, fnorm, 1.0)
        actred = torch.where(0.1 * fnorm1 < fnorm, 1.0 - (fnorm1 / fsafe) ** 2, -1.0)
        jp2 = (_bdot(st["Bs"], zst) * zst).sum(-1)  # ||J p||^2 (scaled)
        temp1sq = jp2 / fsafe ** 2
        temp2sq = par * pnorm * pnorm / fsafe ** 2
        prered = temp1sq + 2.0 * temp2sq
        dirder = -(temp1sq + temp2sq)
        ratio = torch.where(prered != 0, actred / torch.where(prered != 0, prered, 1.0), 0.0)
        low = ratio <= 0.25
        tmp = torch.where(actred >= 0, 0.5, 0.5 * dirder / (dirder + 0.5 * actred))
        tmp = torch.where((0.1 * fnorm1 >= fnorm) | (tmp < 0.1) | ~torch.isfinite(tmp), 0.1, tmp)
        big = (~low) & ((par == 0) | (ratio >= 0.75))
        delta = torch.where(low, tmp * torch.minimum(delta, pnorm / 0.1),
                            torch.where(big, pnorm / 0.5, delta))
        par = torch.where(low, par / tmp, torch.where(big, 0.5 * par, par))
        if hold is not None:  # windows stopped or restarting take no trial step
            run = ~hold
            ok = run & (ratio >= 1e-4)
            st["nfev"] += run.to(torch.int64)
            delta = torch.where(run, delta, st["delta"])
            par = torch.where(run, par, st["par"])
        else:
            ok = ratio >= 1e-4
            st["nfev"] += 1
        st["u"] = torch.where(ok[:, None], u_try, st["u"])
        st["f"] = torch.where(ok[:, None], f1, st["f"])
        st["fnorm"] = torch.where(ok, fnorm1, fnorm)
        xnorm = torch.where(ok, torch.linalg.vector_norm(st["diag"] * u_try, dim=-1), st["xnorm"])
        st["xnorm"] = xnorm
        st["first"] = first & ~ok
        st["need_jac"] = st["need_jac"] | ok
        st["delta"] = delta
        st["par"] = par
        # convergence tests, in MINPACK's order: 1 ftol, 2 xtol, 3 both; 5 evaluations;
        # 6, 7, 8 tolerances below machine precision; -2 non-finite
        fcond = (actred.abs() <= ftol) & (prered <= ftol) & (ratio <= 2.0)
        xcond = delta <= xtol * xnorm
        code = fcond.to(torch.int64) + 2 * xcond.to(torch.int64)
        nfev = st["nfev"]
        code = torch.where((code == 0) & (nfev >= maxfev), 5, code)
        tiny = torch.where((actred.abs() <= _EPS) & (prered <= _EPS) & (ratio <= 2.0), 6,
                           torch.where(delta <= _EPS * xnorm, 7,
                                       torch.where(st["gnorm"] <= _EPS, 8, 0)))
        code = torch.where(code == 0, tiny, code)
        bad = ~torch.isfinite(st["fnorm"]) | ~torch.isfinite(st["u"]).all(dim=-1)
        code = torch.where(bad & (code == 0), -2, code)
        info = code if hold is None else torch.where(hold, pre_info, code)

        # ---- restarts: a fresh lmdif (lmfit called again from the values it handed back),
        # which resets the scaling D that MINPACK only ever lets grow. lmfit counts R calls
        # for the aborted run; the total budget is max_nfev.
        if restart_at is not None:
            rs, point = restart_at
            ri = torch.nonzero(rs).squeeze(1)
            done = st["nfev0"][ri] + restart >= maxfev
            if bool(done.any()):
                info[ri[done]] = 5
                ri = ri[~done]
            if ri.numel():
                u_new = mdl.internal(mdl.external(point[ri]))  # via the external values
                st["u"][ri] = u_new
                st["f"][ri] = mdl.residual(u_new, st["data"][ri], st["w"][ri])
                st["fnorm"][ri] = torch.linalg.vector_norm(st["f"][ri], dim=-1)
                st["nfev0"][ri] = st["nfev0"][ri] + restart
                st["nfev"][ri] = st["nfev0"][ri] + 1
                st["first"][ri] = True
                st["need_jac"][ri] = True
                st["par"][ri] = 0.0

        # ---- retire finished windows, refill from the queue
        fin = info != 0
        if bool(fin.any()):
            fi = torch.nonzero(fin).squeeze(1)
            ids = st["ids"][fi]
            out_u[ids] = st["u"][fi]
            out_chi[ids] = st["fnorm"][fi] ** 2
            out_nfev[ids] = st["nfev"][fi]
            out_info[ids] = info[fi]
            keep = torch.nonzero(~fin).squeeze(1)
            st = {key: val[keep] for key, val in st.items()}
            room = cap - st["ids"].numel()
            if nxt < n and room > 0:
                take = min(room, n - nxt)
                new = _new_state(mdl, torch.arange(nxt, nxt + take, device=dev),
                                 u_all[nxt:nxt + take].clone(), data_all[nxt:nxt + take],
                                 w_all[nxt:nxt + take])
                nxt += take
                st = {key: torch.cat([st[key], new[key]]) for key in _STATE_KEYS}
    return out_u, out_chi, out_nfev, out_info


def fit_batched(data: np.ndarray, good: Optional[np.ndarray] = None,
                cfg: Optional[LabelFitConfig] = None, p0: Optional[np.ndarray] = None,
                gain=None) -> WindowFits:
    """Fit windows ``data`` (N, w, w) with good-pixel mask ``good`` (N, w, w), all at once.

    ``p0`` (N, 11) starting values in ADU (default :func:`~peaknet.label.pvoigt.initial_guess`);
    ``gain``: ADU per photon, a number or (N,) (default ``cfg.adu_per_photon``, 1 if "auto"):
    the fit runs on data / gain (as the lmfit reference), A, a, b, c come back in ADU, chisqr
    in photon units.
    Uses ``cfg.device``, ``cfg.batch_size`` (working-set size), ``cfg.max_nfev``,
    ``cfg.ftol``, ``cfg.xtol``, ``cfg.width_min``/``width_max``. Returns
    :class:`~peaknet.label.pvoigt.WindowFits` with solver "batched".
    """
    cfg = cfg or LabelFitConfig()
    t0 = time.perf_counter()
    data = np.asarray(data, dtype=np.float64)
    n, h, w = data.shape
    g = window_gains(n, gain, cfg)
    good = np.isfinite(data) if good is None else (np.asarray(good, bool) & np.isfinite(data))
    data = np.where(good, data / g[:, None, None], 0.0)
    lo, hi = param_bounds(w, cfg.width_min, cfg.width_max)
    if p0 is None:
        p0 = initial_guess(data, good, cfg.width_min, cfg.width_max, cfg.guess_core_fraction)
    else:
        p0 = scale_params(np.asarray(p0, dtype=np.float64).reshape(n, NPARAMS), 1.0 / g)
    out = WindowFits.empty(n, "batched")
    out.extra["adu_per_photon"] = g
    out.ndata = good.sum(axis=(1, 2)).astype(np.int64)
    if n == 0:
        return out
    fit = np.flatnonzero(out.ndata > NPARAMS)  # fewer pixels than parameters: not fitted
    out.info[out.ndata <= NPARAMS] = -3
    if fit.size:
        u0 = to_internal(p0[fit], lo, hi)
        weights = pixel_weights(data[fit], good[fit])
        device = resolve_device(cfg.device)
        mdl = _Model(w, lo, hi, device)
        m = fit.size
        res = _solve(mdl, torch.as_tensor(u0, device=device),
                     torch.as_tensor(data[fit].reshape(m, -1), device=device),
                     torch.as_tensor(weights.reshape(m, -1), device=device), cfg)
        u, chisq, nfev, info = (r.cpu().numpy() for r in res)
        out.params[fit] = scale_params(to_external(u, lo, hi), g[fit])
        out.chisqr[fit] = chisq
        out.nfev[fit] = nfev
        out.info[fit] = info
        finite = np.all(np.isfinite(out.params[fit]), axis=1) & np.isfinite(out.chisqr[fit])
        out.info[fit[~finite]] = -2
    out.converged = (out.info >= 1) & (out.info <= 4)
    out.seconds = time.perf_counter() - t0
    return out
