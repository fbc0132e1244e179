"""Focal and distillation losses against direct computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peaknet.model.losses import (
    DistillationLoss,
    FocalLoss,
    distillation_loss,
    focal_loss,
    kd_kl_loss,
    kd_mse_loss,
)


def _np_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _np_focal_per_pixel(logits, target, alpha, gamma):
    """Direct per-pixel formula, float64, loops over pixels on purpose."""
    b, c, h, w = logits.shape
    p = _np_softmax(logits.astype(np.float64), axis=1)
    out = np.zeros((b, h, w))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = target[i, y, x]
                if t < 0:
                    continue
                pt = p[i, t, y, x]
                out[i, y, x] = -alpha[t] * (1 - pt) ** gamma * np.log(pt)
    return out


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 5, 7, generator=g) * 3
    target = torch.randint(0, 2, (2, 5, 7), generator=g)
    return logits, target


def test_focal_matches_direct_formula(data):
    logits, target = data
    target = target.clone()
    target[0, 0, :3] = -100  # ignored
    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    mask[1, 4, :] = False
    ref = _np_focal_per_pixel(logits.numpy(), target.numpy(), (0.25, 0.75), 2.0)
    valid = (target.numpy() >= 0) & mask.numpy()
    expect = ref[valid].sum() / valid.sum()
    got = focal_loss(logits, target, (0.25, 0.75), 2.0, mask=mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expect, rel=1e-5)
    per = focal_loss(logits, target, reduction="none", mask=mask)
    np.testing.assert_allclose(per.numpy(), np.where(valid, ref, 0.0), rtol=1e-5, atol=1e-7)
    assert focal_loss(logits, target, reduction="sum", mask=mask).item() == pytest.approx(
        ref[valid].sum(), rel=1e-5
    )
    assert FocalLoss()(logits, target, mask).item() == pytest.approx(expect, rel=1e-5)


def test_focal_gamma0_alpha1_is_cross_entropy(data):
    logits, target = data
    target = target.clone()
    target[1, 2, 3] = -100
    got = focal_loss(logits, target, alpha=(1.0, 1.0), gamma=0.0)
    ref = F.cross_entropy(logits, target, ignore_index=-100)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    got_none_alpha = focal_loss(logits, target, alpha=None, gamma=0.0)
    assert got_none_alpha.item() == pytest.approx(ref.item(), rel=1e-6)


def test_focal_all_ignored_is_zero_with_grad(data):
    logits, target = data
    logits = logits.clone().requires_grad_(True)
    loss = focal_loss(logits, torch.full_like(target, -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_focal_bf16_logits_computed_in_float32(data):
    logits, target = data
    got = focal_loss(logits.bfloat16(), target)
    ref = focal_loss(logits.bfloat16().float(), target)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_focal_alpha_length_checked(data):
    logits, target = data
    with pytest.raises(ValueError):
        focal_loss(logits, target, alpha=(0.2, 0.3, 0.5))


def _direct_kl(s, t, T):
    """sum over pixels and classes of p_t (log p_t - log p_s), / (B*H*W), * T^2 (float64)."""
    s = s.double().numpy() / T
    t = t.double().numpy() / T
    ps = _np_softmax(s, 1)
    pt = _np_softmax(t, 1)
    b, c, h, w = s.shape
    kl = (pt * (np.log(pt) - np.log(ps))).sum()
    return kl / (b * h * w) * T * T


def test_kl_term_matches_direct_and_kldivloss():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 2, 4, 6, generator=g)
    t = torch.randn(3, 2, 4, 6, generator=g) * 2
    for T in (1.0, 2.0, 3.5):
        got = kd_kl_loss(s, t, T)
        assert got.item() == pytest.approx(_direct_kl(s, t, T), rel=1e-5)
        fold = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 2)  # noqa: E731
        ref = torch.nn.KLDivLoss(reduction="batchmean")(
            F.log_softmax(fold(s) / T, 1), F.softmax(fold(t) / T, 1)
        ) * T * T
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert kd_kl_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_mse_term_matches_direct():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 2, 3, 5, generator=g)
    t = torch.randn(2, 2, 3, 5, generator=g)
    expect = ((s.double() - t.double()) ** 2).mean().item()
    assert kd_mse_loss(s, t).item() == pytest.approx(expect, rel=1e-6)


def test_distillation_total_and_parts():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 2, 6, 6, generator=g, requires_grad=True)
    t = torch.randn(2, 2, 6, 6, generator=g) * 3
    parts = distillation_loss(s, t)
    mse = ((s.detach().double() - t.double()) ** 2).mean().item()
    kl = _direct_kl(s.detach(), t, 2.0)
    pseudo = t.argmax(1)
    foc = _np_focal_per_pixel(s.detach().numpy(), pseudo.numpy(), (0.25, 0.75), 2.0).mean()
    assert parts.mse.item() == pytest.approx(mse, rel=1e-5)
    assert parts.kl.item() == pytest.approx(kl, rel=1e-5)
    assert parts.focal.item() == pytest.approx(foc, rel=1e-5)
    assert parts.total.item() == pytest.approx(0.4 * mse + 0.4 * kl + 0.2 * foc, rel=1e-5)
    parts.total.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    # configurable weights and temperature
    mod = DistillationLoss(temperature=4.0, lam_mse=1.0, lam_kl=0.0, lam_focal=0.5, gamma=0.0)
    p2 = mod(s.detach(), t)
    foc0 = _np_focal_per_pixel(s.detach().numpy(), pseudo.numpy(), (0.25, 0.75), 0.0).mean()
    assert p2.kl.item() == pytest.approx(_direct_kl(s.detach(), t, 4.0), rel=1e-5)
    assert p2.total.item() == pytest.approx(mse + 0.5 * foc0, rel=1e-5)
    assert set(p2.as_floats()) == {"total", "mse", "kl", "focal"}


def test_distillation_mask_equals_selected_pixels():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(1, 2, 4, 8, generator=g)
    t = torch.randn(1, 2, 4, 8, generator=g)
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)
    mask[..., :5] = True
    got = distillation_loss(s, t, mask=mask)
    ref = distillation_loss(s[..., :5], t[..., :5])
    for k in ("total", "mse", "kl", "focal"):
        assert getattr(got, k).item() == pytest.approx(getattr(ref, k).item(), rel=1e-5)


def test_distillation_teacher_half_precision():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(1, 2, 4, 4, generator=g)
    t = torch.randn(1, 2, 4, 4, generator=g).half()
    parts = distillation_loss(s, t)
    ref = distillation_loss(s, t.float())
    assert parts.total.dtype == torch.float32
    assert parts.total.item() == pytest.approx(ref.total.item(), rel=1e-6)
