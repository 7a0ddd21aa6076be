"""Tests of the classifier zoo: the GapClassifier contract, the builders and local-weight loading."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from defend.models import ARCHITECTURES, GapClassifier, Normalize, build_classifier
from defend.models.imagenet import IMAGENET_MEAN, IMAGENET_STD, densenet169, resnet50, vgg16
from defend.models.small import CIFAR_MEAN, CIFAR_STD, wide_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


def images(shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


SMALL = [
    ("small_cnn", {}),
    ("resnet18_cifar", {}),
    ("wide_resnet", {}),
    ("wide_resnet", {"batchnorm": False}),
]


@pytest.mark.parametrize("arch,kwargs", SMALL, ids=["small_cnn", "resnet18_cifar", "wrn_bn", "wrn_nobn"])
def test_small_zoo_models_follow_the_gap_contract(arch, kwargs):
    torch.manual_seed(0)
    model = build_classifier(arch, 10, **kwargs).eval()
    assert isinstance(model, GapClassifier)
    assert isinstance(model.normalize, Normalize)
    assert isinstance(model.features, nn.Sequential) and len(model.features) == len(model.stage_channels)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10
    x = images((2, 3, 32, 32), seed=1)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        stages = model.forward_stages(x)
    assert logits.shape == (2, 10) and bool(torch.isfinite(logits).all())
    assert torch.equal(logits, model.head(model.pool(feats)))
    # GAP -> linear in closed form
    torch.testing.assert_close(logits, feats.mean((2, 3)) @ model.head.weight.T + model.head.bias,
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(stages[-1], feats)
    assert [s.shape[1] for s in stages] == model.stage_channels
    assert feats.shape[1] == model.head.in_features
    # the normalisation lives inside the model
    torch.testing.assert_close(model.normalize(x), (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
                               / torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
    d = model.describe()
    assert d["arch"] == arch and d["num_classes"] == 10 and d["input_size"] == 32 and d["in_channels"] == 3
    assert d["mean"] == pytest.approx(CIFAR_MEAN) and d["std"] == pytest.approx(CIFAR_STD)
    # normalisation statistics travel with the checkpoint
    sd = model.state_dict()
    assert "normalize.mean" in sd and "normalize.std" in sd
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_bn == kwargs.get("batchnorm", True)


def test_small_cnn_stage_resolutions():
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 5, width=4).eval()
    with torch.no_grad():
        stages = model.forward_stages(images((1, 3, 32, 32)))
    assert [tuple(s.shape[1:]) for s in stages] == [(4, 32, 32), (8, 16, 16), (16, 8, 8)]
    assert model(images((1, 3, 32, 32))).shape == (1, 5)


def test_build_classifier_errors():
    with pytest.raises(ValueError) as err:
        build_classifier("resnet9000", 10)
    msg = str(err.value)
    assert "resnet9000" in msg and all(name in msg for name in ARCHITECTURES)
    with pytest.raises(ValueError, match="6n\\+4"):
        wide_resnet(depth=15)
    with pytest.raises(ValueError, match="depth"):
        build_classifier("wide_resnet", 10, depth=20)
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("small_cnn", 1, width=4)


def test_wide_resnet_depth_sets_block_count():
    for depth, n in ((10, 1), (16, 2)):
        model = wide_resnet(depth=depth, widen=1)
        assert all(len(stage if i else stage[1]) == n for i, stage in enumerate(model.features))


@pytest.mark.parametrize("build", [resnet50, densenet169, vgg16], ids=["resnet50", "densenet169", "vgg16"])
def test_imagenet_models_build_and_forward(build):
    torch.manual_seed(0)
    model = build(num_classes=10).eval()
    assert isinstance(model, GapClassifier) and isinstance(model.head, nn.Linear)
    x = images((1, 3, 64, 64), seed=2)
    with torch.no_grad():
        stages = model.forward_stages(x)
        logits = model.head(model.pool(stages[-1]))
    assert logits.shape == (1, 10) and bool(torch.isfinite(logits).all())
    assert [s.shape[1] for s in stages] == model.stage_channels
    assert stages[-1].shape[1] == model.head.in_features
    d = model.describe()
    assert d["input_size"] == 224 and d["num_classes"] == 10
    assert d["mean"] == pytest.approx(IMAGENET_MEAN) and d["std"] == pytest.approx(IMAGENET_STD)


def test_vgg16_two_channel_input():
    torch.manual_seed(0)
    model = vgg16(num_classes=3, in_channels=2).eval()
    assert model.in_channels == 2 and model.describe()["in_channels"] == 2
    with torch.no_grad():
        out = model(images((1, 2, 64, 64), seed=3))
    assert out.shape == (1, 3) and bool(torch.isfinite(out).all())


def test_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        densenet169(pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError):
        build_classifier("resnet50", 1000, pretrained=str(tmp_path / "missing.pth"))


def test_pretrained_foreign_file_raises_value_error(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="does not look like"):
        densenet169(pretrained=str(path))
    torch.save({}, path)  # nothing matches: every key is missing
    with pytest.raises(ValueError, match="does not look like"):
        densenet169(pretrained=str(path))


def test_pretrained_local_state_dict_is_loaded(tmp_path):
    torch.manual_seed(123)
    ref = tvm.densenet169(weights=None)
    path = tmp_path / "densenet169.pth"
    torch.save({"state_dict": ref.state_dict()}, path)  # wrapped in a "state_dict" key
    model = densenet169(num_classes=1000, pretrained=str(path))
    torch.testing.assert_close(model.features[0][0].weight, ref.features.conv0.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.features[3][1].running_var, ref.features.norm5.running_var, rtol=0, atol=0)
    # with the ImageNet class count the classifier is copied into the head
    torch.testing.assert_close(model.head.weight, ref.classifier.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.head.bias, ref.classifier.bias, rtol=0, atol=0)
