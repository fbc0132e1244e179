"""PeakNet model, presets, pre-processing and decoding.

Small inputs only (the machine is shared); the teacher is only ever built on the meta device.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import inspect  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from peaknet.model import (  # noqa: E402
    Backbone,
    BiFPN,
    BiFPNBlock,
    PeakNet,
    build_model,
    decode_peaks,
    get_preset,
    label_components,
    list_presets,
    pad_crop,
    prepare_images,
    prepare_panels,
    segment,
    zscore,
)
from peaknet.model import bifpn as bifpn_mod  # noqa: E402
from peaknet.model.bifpn import FastNormalizedFusion, SeparableConvNormAct  # noqa: E402
from peaknet.model.head import SegmentationHead  # noqa: E402
from peaknet.peaks import PeakList  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

EXPECTED_PRESETS = {
    "teacher", "small-cpu",
    "student-tiny-b1", "student-tiny-b2", "student-tiny-b4",
    "student-atto-b1", "student-atto-b2", "student-atto-b4",
}
REAL_FORWARD = ["small-cpu", "student-atto-b1", "student-tiny-b1"]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return build_model("small-cpu").eval()


# ---------------------------------------------------------------- presets and parameter counts
def test_registry_lists_all_presets():
    assert set(list_presets()) == EXPECTED_PRESETS
    with pytest.raises(KeyError, match="known"):
        get_preset("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_param_count_and_meta_forward(name):
    spec = get_preset(name)
    model = build_model(name, device="meta")
    counts = model.param_counts()
    assert counts["total"] == spec.params
    assert counts["backbone"] == spec.backbone_params
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert model.bifpn.width == spec.bifpn_width
    assert len(model.bifpn.blocks) == spec.bifpn_blocks
    y = model(torch.empty(2, 1, 96, 80, device="meta"))
    assert y.shape == (2, 2, 96, 80)


def test_teacher_matches_paper_sizes():
    counts = build_model("teacher", device="meta").param_counts()
    assert 657e6 < counts["backbone"] < 659e6  # paper: 658M ConvNeXtV2 backbone
    assert 672e6 < counts["total"] < 674e6  # paper: ~673M in all


@pytest.mark.parametrize("name", REAL_FORWARD)
def test_preset_real_forward(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 64, 64))
    assert y.shape == (1, 2, 64, 64)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_build_model_overrides():
    m = build_model("small-cpu", device="meta", bifpn_blocks=2, drop_path_rate=0.1)
    assert len(m.bifpn.blocks) == 2


# ---------------------------------------------------------------- backbone
def test_backbone_channels_from_feature_info():
    with torch.device("meta"):
        bb = Backbone("convnextv2_atto")
    assert bb.channels == [40, 80, 160, 320]
    assert bb.strides == [4, 8, 16, 32]
    feats = bb(torch.empty(1, 1, 64, 64, device="meta"))
    assert [tuple(f.shape) for f in feats] == [
        (1, 40, 16, 16), (1, 80, 8, 8), (1, 160, 4, 4), (1, 320, 2, 2)
    ]


def test_backbone_swappable_drops_stride2_level():
    torch.manual_seed(0)
    model = PeakNet("resnet18", bifpn_width=32, bifpn_blocks=1, head_width=32)
    assert model.backbone.strides == [4, 8, 16, 32]
    assert model.backbone.channels == [64, 128, 256, 512]
    with torch.no_grad():
        y = model.eval()(torch.randn(1, 1, 64, 64))
    assert y.shape == (1, 2, 64, 64)


# ---------------------------------------------------------------- model behaviour
@pytest.mark.parametrize("hw", [(64, 64), (50, 70), (33, 97)])
def test_forward_any_size(small, hw):
    with torch.no_grad():
        y = small(torch.randn(2, 1, *hw))
    assert y.shape == (2, 2, *hw)
    assert torch.isfinite(y).all()


def test_padding_is_cropped_not_resampled(small):
    """Output at an odd size equals the output on the zero-padded input, cropped."""
    x = torch.randn(1, 1, 50, 70)
    with torch.no_grad():
        y = small(x)
        y_pad = small(F.pad(x, (0, 26, 0, 14)))  # 64 x 96
    torch.testing.assert_close(y, y_pad[..., :50, :70])


def test_backward_gives_finite_grads(small):
    model = build_model("small-cpu").train()
    x = torch.randn(1, 1, 64, 64)
    target = (torch.rand(1, 64, 64) > 0.95).long()
    from peaknet.model import focal_loss

    loss = focal_loss(model(x), target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_initial_peak_probability_is_prior(small):
    with torch.no_grad():
        p = torch.softmax(small(torch.randn(1, 1, 64, 64)), 1)[:, 1]
    assert 0.001 < p.mean().item() < 0.1


def test_bf16_autocast_forward(small):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = small(torch.randn(1, 1, 64, 64))
    assert y.shape == (1, 2, 64, 64) and torch.isfinite(y.float()).all()


# ---------------------------------------------------------------- BiFPN
def test_no_batchnorm_and_real_3x3_depthwise(small):
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in small.modules())
    convs = [m for m in small.bifpn.modules() if isinstance(m, SeparableConvNormAct)]
    assert len(convs) == 6  # 3 top-down + 3 bottom-up for 4 levels, 1 block
    for c in convs:
        assert c.dw.kernel_size == (3, 3) and c.dw.groups == c.dw.in_channels
        assert c.pw.kernel_size == (1, 1)
        assert isinstance(c.norm, nn.LayerNorm) and isinstance(c.act, nn.GELU)


def test_fast_normalized_fusion_formula():
    fuse = FastNormalizedFusion(3, eps=1e-4)
    with torch.no_grad():
        fuse.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    xs = [torch.randn(1, 4, 3, 3) for _ in range(3)]
    w = torch.relu(fuse.weight.detach())
    expect = (w[0] * xs[0] + w[1] * xs[1] + w[2] * xs[2]) / (w.sum() + 1e-4)
    torch.testing.assert_close(fuse(xs), expect)


def test_layernorm2d_matches_channels_last_layernorm():
    ln = bifpn_mod.LayerNorm2d(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    x = torch.randn(2, 8, 5, 6)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (8,), ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)


def test_bifpn_shapes_and_stacking():
    torch.manual_seed(0)
    bifpn = BiFPN([8, 16, 32, 64], width=16, num_blocks=3)
    feats = [torch.randn(2, c, 32 // 2**i, 40 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    out = bifpn(feats)
    assert [tuple(o.shape) for o in out] == [(2, 16, 32 // 2**i, 40 // 2**i) for i in range(4)]
    assert len(bifpn.blocks) == 3
    blk = BiFPNBlock(16, 4)
    assert [f.weight.numel() for f in blk.td_fuse] == [2, 2, 2]
    assert [f.weight.numel() for f in blk.bu_fuse] == [3, 3, 2]


def test_bifpn_top_down_reaches_finest_level():
    """A change in the coarsest input alters the finest output (top-down path works) and a change
    in the finest input alters the coarsest output (bottom-up path works)."""
    torch.manual_seed(0)
    blk = BiFPNBlock(8, 4).eval()
    feats = [torch.randn(1, 8, 16 // 2**i, 16 // 2**i) for i in range(4)]
    base = blk(feats)
    f2 = list(feats)
    f2[3] = f2[3] + 1.0
    assert not torch.allclose(blk(f2)[0], base[0])
    f3 = list(feats)
    f3[0] = f3[0] + torch.randn_like(f3[0])
    assert not torch.allclose(blk(f3)[3], base[3])


# ---------------------------------------------------------------- head
def test_head_dual_pathway():
    torch.manual_seed(0)
    head = SegmentationHead(16, num_levels=4, width=16, num_classes=2)
    up = head.learned_up
    assert isinstance(up, nn.ConvTranspose2d)
    assert (up.kernel_size, up.stride, up.padding) == ((6, 6), (4, 4), (1, 1))
    feats = [torch.randn(1, 16, 16 // 2**i, 24 // 2**i) for i in range(4)]
    with torch.no_grad():
        y = head(feats)
        assert y.shape == (1, 2, 64, 96)
        # at init the learned pathway is zero: output == bilinear x4 of the stride-4 logits
        acc = sum(b(f) for b, f in zip(head.lateral, feats))
        z = head.classifier(acc)
        torch.testing.assert_close(
            y, F.interpolate(z, scale_factor=4.0, mode="bilinear", align_corners=False)
        )
        up.weight.normal_()
        y2 = head(feats)
        torch.testing.assert_close(
            y2, F.interpolate(z, scale_factor=4.0, mode="bilinear", align_corners=False) + up(z)
        )
    # lateral branch depths: 1, 1, 2, 3 conv layers for strides 4, 8, 16, 32
    assert [len(b.layers) for b in head.lateral] == [1, 1, 2, 3]


# ---------------------------------------------------------------- distributed units, init
def test_fsdp_and_checkpoint_units(small):
    units = small.fsdp_units()
    assert len(units) == 4 + len(small.bifpn.blocks)
    mods = {id(m) for m in small.modules()}
    assert all(id(u) in mods for u in units)
    assert len({id(u) for u in units}) == len(units)
    ac = small.activation_checkpoint_units()
    assert len(ac) == 2 + 2 + 6 + 2 + 1  # atto depths [2,2,6,2] + 1 BiFPN block
    teacher = build_model("teacher", device="meta")
    assert len(teacher.fsdp_units()) == 8
    assert len(teacher.activation_checkpoint_units()) == 3 + 3 + 27 + 3 + 4


def test_model_code_imports_nothing_distributed():
    import peaknet.model.backbone as b
    import peaknet.model.bifpn as f
    import peaknet.model.head as h
    import peaknet.model.peaknet as p

    for mod in (b, f, h, p):
        assert "torch.distributed" not in inspect.getsource(mod)


def test_meta_then_init_weights_matches_fresh_init():
    torch.manual_seed(0)
    ref = build_model("small-cpu")
    mm = build_model("small-cpu", device="meta").to_empty(device="cpu")
    mm.init_weights()
    for (n, p), (n2, q) in zip(ref.named_parameters(), mm.named_parameters()):
        assert n == n2
        assert torch.isfinite(q).all(), n
        if (p == p.flatten()[0]).all():  # constants (norm weights/biases, GRN, fusion, ...)
            assert torch.equal(p, q), n
        else:
            assert abs(p.std().item() - q.std().item()) < 0.3 * p.std().item(), n


# ---------------------------------------------------------------- pre-processing
def test_zscore_over_good_pixels_only():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 5, size=(2, 20, 30)).astype(np.float32)
    mask = np.ones_like(x, dtype=bool)
    mask[0, :5] = False
    x[0, :5] = 1e6  # bad pixels must not affect the statistics
    x[1, 3, 4] = np.nan  # non-finite -> bad
    z = zscore(x, mask).numpy()
    for i in range(2):
        good = mask[i] & np.isfinite(x[i])
        v = x[i][good].astype(np.float64)
        np.testing.assert_allclose(z[i][good], (v - v.mean()) / (v.std() + 1e-6), rtol=1e-4, atol=1e-4)
        assert np.all(z[i][~good] == 0)
    assert np.isfinite(z).all()
    # constant image: all zeros, no division blow-up
    assert torch.all(zscore(np.full((4, 4), 7.0)) == 0)


def test_pad_crop_offsets_round_trip():
    img = torch.arange(5 * 7, dtype=torch.float32).reshape(5, 7)
    out, info = pad_crop(img, size=(9, 4))  # pad rows, crop columns
    assert out.shape == (9, 4)
    assert info.offset == (2, -1)
    # every canvas pixel that comes from the image maps back to it
    for i in range(9):
        for j in range(4):
            si, sj = info.to_input(i, j)
            if 0 <= si < 5 and 0 <= sj < 7:
                assert out[i, j] == img[si, sj]
            else:
                assert out[i, j] == 0
    back = info.restore(out)
    assert back.shape == (5, 7)
    torch.testing.assert_close(back[:, 1:5], img[:, 1:5])
    assert torch.all(back[:, [0, 5, 6]] == 0)


def test_prepare_images_batched():
    rng = np.random.default_rng(1)
    imgs = rng.normal(10, 2, size=(2, 40, 50)).astype(np.float32)
    mask = np.ones((40, 50), dtype=bool)
    mask[:, :3] = False
    x, info = prepare_images(imgs, mask, size=64)
    assert x.shape == (2, 1, 64, 64) and x.dtype == torch.float32
    assert info.offset == (12, 7)
    inner = info.restore(x[:, 0])
    assert torch.all(inner[:, :, :3] == 0)
    g = inner[:, :, 3:]
    assert g.mean(dim=(1, 2)).abs().max() < 1e-4
    assert torch.all(x[:, :, :12] == 0)  # padding is 0


def test_prepare_panels_and_split():
    rng = np.random.default_rng(2)
    stack = rng.normal(5, 1, size=(3, 4, 20, 30)).astype(np.float32)  # B=3 frames, P=4 panels
    stack[:, 1] += 100  # one bright panel
    x, info = prepare_panels(stack, multiple=32, norm="frame")
    assert x.shape == (12, 1, 32, 32)
    assert torch.all(x[:, :, 20:] == 0) and torch.all(x[:, :, :, 30:] == 0)
    crops = info.split(x)  # (B, P, 1, 20, 30)
    assert crops.shape == (3, 4, 1, 20, 30)
    expect = zscore(stack, ndim=3)
    torch.testing.assert_close(crops[:, :, 0], expect)
    xp, _ = prepare_panels(stack[0], norm="panel")  # single (P, H, W) stack
    assert xp.shape == (4, 1, 32, 32)
    per_panel_mean = xp[:, 0, :20, :30].mean(dim=(1, 2))
    assert per_panel_mean.abs().max() < 1e-4


# ---------------------------------------------------------------- decoding
def _logits_from_mask(mask):
    m = torch.as_tensor(mask).float()
    return torch.stack([torch.zeros_like(m), 10 * m - 5], dim=-3)


def test_segment_argmax_and_threshold():
    logits = torch.tensor([[[[0.0, 1.0, 2.0]]], [[[0.0, 1.0, 0.0]]]]).reshape(1, 2, 1, 3)
    # class0 = [0,1,2], class1 = [0,1,0]: ties -> background
    assert segment(logits).tolist() == [[[False, False, False]]]
    logits2 = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]]).reshape(1, 2, 1, 3)
    assert segment(logits2).tolist() == [[[True, False, False]]]
    assert segment(logits2, threshold=0.5).tolist() == [[[True, False, True]]]
    probs = torch.softmax(logits2, 1)
    assert torch.equal(segment(probs, 0.6, from_probs=True), segment(logits2, 0.6))
    # more classes, ties included: same as argmax == peak_class (first maximum wins)
    x = torch.randint(0, 3, (2, 4, 5, 6)).float()
    for pc in range(4):
        assert torch.equal(segment(x, peak_class=pc), x.argmax(-3) == pc)
    x = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(
        segment(x, 0.3, peak_class=2).float(), (torch.softmax(x, 1)[:, 2] >= 0.3).float()
    )


def test_label_components_8_connectivity_and_slices():
    m = np.zeros((2, 6, 6), dtype=bool)
    m[0, 1, 1] = m[0, 2, 2] = True  # diagonal: one component
    m[0, 4, 4] = True
    m[1, 1, 1] = True  # same place, other slice: its own component
    lab, n = label_components(m)
    assert n == 3
    assert lab[0, 1, 1] == lab[0, 2, 2] != lab[0, 4, 4]
    assert lab[1, 1, 1] not in (lab[0, 1, 1], lab[0, 4, 4])
    lab_t, n_t = label_components(torch.from_numpy(m), backend="torch")
    assert n_t == n
    _assert_same_partition(lab, lab_t)


def _assert_same_partition(a, b):
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    assert np.array_equal(a == 0, b == 0)
    pairs = set(zip(a[a > 0].tolist(), b[b > 0].tolist()))
    assert len(pairs) == len(set(a[a > 0].tolist())) == len(set(b[b > 0].tolist()))


def test_torch_labelling_matches_scipy_on_random_masks():
    rng = np.random.default_rng(3)
    m = rng.random((3, 40, 50)) > 0.7  # many irregular components, incl. long snakes
    lab, n = label_components(m)
    lab_t, n_t = label_components(torch.from_numpy(m), backend="torch")
    assert n == n_t
    _assert_same_partition(lab, lab_t)


def _brute_force_measure(frame, comp, others, good, r_in, r_out):
    """Per-component reference with explicit distances (slow, fine for tiny frames)."""
    h, w = frame.shape
    yy, xx = np.mgrid[:h, :w]
    peak_any = comp | others
    py, px = np.nonzero(peak_any)
    cy, cx = np.nonzero(comp)
    d_all = np.sqrt((yy[..., None] - py) ** 2 + (xx[..., None] - px) ** 2).min(-1)
    d_comp = np.sqrt((yy[..., None] - cy) ** 2 + (xx[..., None] - cx) ** 2).min(-1)
    ring = (~peak_any) & good & (d_comp > r_in) & (d_comp <= r_out) & (d_comp <= d_all)
    bg = np.median(frame[ring])
    sigma = max(frame[ring].std(), 0.01)
    v = frame[comp]
    wgt = np.maximum(v - bg, 0)
    return {
        "npix": comp.sum(), "intensity": (v - bg).sum(), "max_value": v.max() - bg,
        "ss": (wgt * cy).sum() / wgt.sum(), "fs": (wgt * cx).sum() / wgt.sum(),
        "snr": (v - bg).sum() / sigma,
    }


def _synthetic_frame(seed=4, h=40, w=48):
    rng = np.random.default_rng(seed)
    frame = rng.normal(20.0, 2.0, size=(h, w))
    yy, xx = np.mgrid[:h, :w]
    centres = [(10.3, 12.6, 400.0), (25.0, 30.2, 250.0), (30.7, 8.4, 150.0)]
    for cy, cx, a in centres:
        frame += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.0**2))
    return frame.astype(np.float32), centres


def test_decode_measurements_match_direct_computation():
    frame, centres = _synthetic_frame()
    pk = frame > 60
    good = np.ones_like(pk)
    good[0:3, :] = False
    lists = decode_peaks(_logits_from_mask(pk), frame, good)
    assert len(lists) == 1
    peaks = lists[0]
    assert isinstance(peaks, PeakList) and len(peaks) == 3
    lab, n = label_components(pk & good)
    for k in range(1, n + 1):
        comp = lab == k
        ref = _brute_force_measure(frame, comp, (lab > 0) & ~comp, good, 2.0, 5.0)
        i = int(np.argmin((peaks.ss - ref["ss"]) ** 2 + (peaks.fs - ref["fs"]) ** 2))
        assert peaks.npix[i] == ref["npix"]
        assert peaks.panel[i] == 0
        for key in ("intensity", "max_value", "ss", "fs", "snr"):
            assert getattr(peaks, key)[i] == pytest.approx(ref[key], rel=1e-4, abs=1e-3), key
    # centroids land on the true centres
    for cy, cx, _ in centres:
        d = np.hypot(peaks.ss - cy, peaks.fs - cx).min()
        assert d < 0.3


def test_decode_stack_layout_panel_is_crop_index():
    frame, centres = _synthetic_frame()
    stack = np.stack([np.full_like(frame, 20.0), frame, frame[::-1].copy()])  # (P=3, H, W)
    batch = np.stack([stack, stack[::-1].copy()])  # (B=2, P=3, H, W)
    logits = _logits_from_mask(batch > 60)  # (2, 3, 2, H, W)
    lists = decode_peaks(logits, batch, layout="stack")
    assert len(lists) == 2
    assert lists[0].panel.tolist().count(0) == 0
    assert lists[0].panel.tolist().count(1) == 3 and lists[0].panel.tolist().count(2) == 3
    assert sorted(lists[1].panel.tolist()) == [0, 0, 0, 1, 1, 1]
    p1 = lists[0].take(lists[0].panel == 1)
    for cy, cx, _ in centres:
        assert np.hypot(p1.ss - cy, p1.fs - cx).min() < 0.3
    # single-frame (P, C, H, W) input gives one list
    one = decode_peaks(logits[0], batch[0], layout="stack")
    assert len(one) == 1 and len(one[0]) == 6


def test_decode_from_model_end_to_end(small):
    frame, _ = _synthetic_frame()
    x, info = prepare_images(frame, size=64)
    with torch.no_grad():
        logits = info.restore(small(x))
    assert logits.shape == (1, 2, 40, 48)
    peaks = decode_peaks(logits, frame[None], threshold=0.5)
    assert len(peaks) == 1  # untrained: any number of peaks, but it runs


def test_decode_index_maps_to_modules():
    frame, centres = _synthetic_frame()
    h, w = frame.shape
    pmap = np.where(np.arange(w)[None, :] < 24, 0, 1) * np.ones((h, 1), dtype=int)
    smap = np.repeat(np.arange(h)[:, None], w, 1).astype(float) + 100
    fmap = np.where(pmap == 0, np.arange(w)[None, :], np.arange(w)[None, :] - 24).astype(float)
    peaks = decode_peaks(_logits_from_mask(frame > 60), frame, index_maps=(pmap, smap, fmap))[0]
    plain = decode_peaks(_logits_from_mask(frame > 60), frame)[0]
    for i in range(len(plain)):
        j = int(np.argmin(np.abs(peaks.ss - 100 - plain.ss[i]) + np.abs(peaks.intensity - plain.intensity[i])))
        expect_panel = 0 if plain.fs[i] < 24 else 1
        assert peaks.panel[j] == expect_panel
        assert peaks.ss[j] == pytest.approx(plain.ss[i] + 100, abs=1e-4)
        assert peaks.fs[j] == pytest.approx(plain.fs[i] - 24 * expect_panel, abs=1e-4)


def test_decode_min_max_pix_and_empty():
    frame, _ = _synthetic_frame()
    empty = decode_peaks(_logits_from_mask(np.zeros_like(frame, dtype=bool)), frame)
    assert len(empty) == 1 and len(empty[0]) == 0
    all_peaks = decode_peaks(_logits_from_mask(frame > 60), frame)[0]
    big = decode_peaks(_logits_from_mask(frame > 60), frame, min_pix=int(all_peaks.npix.max()))[0]
    assert len(big) == 1
