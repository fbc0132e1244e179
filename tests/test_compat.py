"""``import timm`` works with the torchvision that exists on these machines."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_timm_imports_and_builds_convnextv2_features():
    import torch

    from peaknet.compat import import_timm

    timm = import_timm()
    model = timm.create_model(
        "convnextv2_atto", pretrained=False, features_only=True, in_chans=1
    )
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.zeros(1, 1, 64, 64))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    # idempotent
    import_timm()
