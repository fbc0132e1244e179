"""Training losses: softmax focal loss (pre-training) and the distillation loss.

Focal loss (Lin et al. 2017; PeakNet paper eq. 1): per pixel ``-alpha_t (1 - p_t)^gamma log p_t``
with ``p_t`` the softmax probability of the target class t and a per-class ``alpha`` (background
0.25, peak 0.75), gamma 2; averaged over the valid pixels (those not equal to ``ignore_index``
and inside ``mask``). Note: the mean is over the *count* of valid pixels, not over the sum of
their alphas (``F.cross_entropy(weight=...)`` normalises by the weight sum instead); the two
agree when all alphas are 1.

Distillation (paper eqs. 2-6): ``lam_mse * MSE(z_s, z_t) + lam_kl * T^2 * KL(p_t(T) || p_s(T))
+ lam_focal * focal(z_s, argmax z_t)`` with 0.4 / 0.4 / 0.2 and T = 2. For the KL term the spatial
dims are folded into the batch ((B, C, H, W) -> (B*H*W, C)) and reduced with ``batchmean``, as
``torch.nn.KLDivLoss(reduction="batchmean")`` on log-probabilities: the sum over classes and
pixels divided by B*H*W, i.e. the mean per-pixel KL.

All losses compute in float32 whatever the logits' dtype (teacher logits are often cached in
bf16/fp16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


def _valid_mask(
    target: torch.Tensor, ignore_index: Optional[int], mask: Optional[torch.Tensor]
) -> torch.Tensor:
    valid = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        valid &= target != ignore_index
    if mask is not None:
        valid &= mask.to(torch.bool).expand_as(target)
    return valid


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: Optional[Sequence[float]] = (0.25, 0.75),
    gamma: float = 2.0,
    ignore_index: Optional[int] = IGNORE_INDEX,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Softmax focal loss with per-class alpha.

    Parameters
    ----------
    logits:
        (N, C, *spatial) float, any float dtype (computed in float32).
    target:
        (N, *spatial) int64 class indices in [0, C), or ``ignore_index``.
    alpha:
        Per-class weights, length C (default background 0.25, peak 0.75); ``None`` = all 1.
    gamma:
        Focusing parameter (0 gives alpha-weighted cross-entropy).
    ignore_index:
        Target value excluded from the loss (``None``: no such value).
    mask:
        Optional (N, *spatial) bool (or 0/1), True = pixel counts. Combined with ignore_index.
    reduction:
        ``"mean"`` (over valid pixels; 0 when there are none), ``"sum"`` or ``"none"``
        ((N, *spatial) per-pixel loss, 0 at invalid pixels).

    Returns a float32 scalar (or per-pixel tensor).
    """
    if logits.dim() != target.dim() + 1:
        raise ValueError(
            f"logits {tuple(logits.shape)} must have one more dim than target {tuple(target.shape)}"
        )
    num_classes = logits.shape[1]
    valid = _valid_mask(target, ignore_index, mask)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    logp = F.log_softmax(logits.float(), dim=1)
    logpt = logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    pt = logpt.exp()
    if gamma == 0:
        loss = -logpt
    else:
        loss = -((1.0 - pt).clamp_min(0.0) ** gamma) * logpt
    if alpha is not None:
        a = torch.as_tensor(alpha, dtype=torch.float32, device=logits.device)
        if a.numel() != num_classes:
            raise ValueError(f"alpha has {a.numel()} entries for {num_classes} classes")
        loss = loss * a[safe_target]
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")


class FocalLoss(nn.Module):
    """Module form of :func:`focal_loss`: ``FocalLoss(alpha, gamma, ignore_index)(logits,
    target, mask=None)``."""

    def __init__(
        self,
        alpha: Optional[Sequence[float]] = (0.25, 0.75),
        gamma: float = 2.0,
        ignore_index: Optional[int] = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.alpha = None if alpha is None else tuple(float(a) for a in alpha)
        self.gamma = float(gamma)
        self.ignore_index = ignore_index

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return focal_loss(logits, target, self.alpha, self.gamma, self.ignore_index, mask)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, ignore_index={self.ignore_index}"


def _fold(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B * prod(spatial), C)."""
    c = x.shape[1]
    return x.movedim(1, -1).reshape(-1, c)


def kd_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` with the spatial dims folded into the batch and
    ``batchmean`` reduction: sum over classes and pixels / number of pixels (valid pixels if
    ``mask`` (B, *spatial) is given). Logits (B, C, *spatial); returns a float32 scalar."""
    T = float(temperature)
    log_ps = F.log_softmax(_fold(student_logits.float()) / T, dim=1)
    log_pt = F.log_softmax(_fold(teacher_logits.float()) / T, dim=1)
    if mask is None:
        kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    else:
        m = mask.to(torch.bool).reshape(-1)
        per_pixel = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(1)
        kl = (per_pixel * m).sum() / m.sum().clamp_min(1)
    return kl * (T * T)


def kd_mse_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean squared difference of the logits over all elements (valid pixels x classes if
    ``mask`` (B, *spatial) is given). Returns a float32 scalar."""
    diff2 = (student_logits.float() - teacher_logits.float()) ** 2
    if mask is None:
        return diff2.mean()
    m = mask.to(torch.bool).unsqueeze(1).expand_as(diff2)
    return (diff2 * m).sum() / m.sum().clamp_min(1)


@dataclass
class DistillationParts:
    """The terms of the distillation loss (float32 scalars): ``total`` = weighted sum."""

    total: torch.Tensor
    mse: torch.Tensor
    kl: torch.Tensor
    focal: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "mse", "kl", "focal")}


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    lam_mse: float = 0.4,
    lam_kl: float = 0.4,
    lam_focal: float = 0.2,
    alpha: Optional[Sequence[float]] = (0.25, 0.75),
    gamma: float = 2.0,
    mask: Optional[torch.Tensor] = None,
) -> DistillationParts:
    """The paper's distillation loss (eq. 2).

    Parameters
    ----------
    student_logits, teacher_logits:
        (B, C, H, W) logits (teacher's may be bf16/fp16; no gradient flows to it).
    temperature:
        T of the KL term (2.0).
    lam_mse, lam_kl, lam_focal:
        Weights (0.4, 0.4, 0.2).
    alpha, gamma:
        Focal-loss parameters for the term against ``argmax(teacher)`` pseudo-labels.
    mask:
        Optional (B, H, W) bool, True = pixel counts in every term (e.g. to leave out padding).
        ``None`` reproduces the paper exactly.

    Returns :class:`DistillationParts` (``.total`` to backpropagate).
    """
    teacher_logits = teacher_logits.detach()
    mse = kd_mse_loss(student_logits, teacher_logits, mask)
    kl = kd_kl_loss(student_logits, teacher_logits, temperature, mask)
    pseudo = teacher_logits.argmax(dim=1)
    foc = focal_loss(student_logits, pseudo, alpha, gamma, ignore_index=None, mask=mask)
    total = lam_mse * mse + lam_kl * kl + lam_focal * foc
    return DistillationParts(total=total, mse=mse, kl=kl, focal=foc)


class DistillationLoss(nn.Module):
    """Module form of :func:`distillation_loss`; ``forward`` returns :class:`DistillationParts`."""

    def __init__(
        self,
        temperature: float = 2.0,
        lam_mse: float = 0.4,
        lam_kl: float = 0.4,
        lam_focal: float = 0.2,
        alpha: Optional[Sequence[float]] = (0.25, 0.75),
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.lam_mse, self.lam_kl, self.lam_focal = float(lam_mse), float(lam_kl), float(lam_focal)
        self.alpha = None if alpha is None else tuple(float(a) for a in alpha)
        self.gamma = float(gamma)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> DistillationParts:
        return distillation_loss(
            student_logits, teacher_logits, self.temperature, self.lam_mse, self.lam_kl,
            self.lam_focal, self.alpha, self.gamma, mask,
        )

    def extra_repr(self) -> str:
        return (
            f"T={self.temperature}, lam_mse={self.lam_mse}, lam_kl={self.lam_kl}, "
            f"lam_focal={self.lam_focal}, alpha={self.alpha}, gamma={self.gamma}"
        )
