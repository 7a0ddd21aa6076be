"""Bring your own model (issue 26): torchvision families in the zoo, ``wrap_classifier`` under the interpreters'
contract (CAM / GRAD equal hand computations, ADV2 stays on the uint8 grid in the ball), and ``defend evaluate
--arch/--weights`` on plain and RobustBench-format state dicts, bad input refused in one line before any work."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _tiny import shape_folder
from torchvision import models as tvm

from attacks import build_attack, get_interpreter
from defend import load_card, wrap_classifier
from defend.evaluate import main
from defend.models import build_classifier
from defend.models.imagenet import TORCHVISION

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
FAST = ["--battery", "quick", "--no-progress", "--battery.n_images=4", "--battery.n_figure=1",
        "--battery.autoattack.eps=[]", "--battery.topk.interpreters=[]", "--battery.attacks.interpreters=[cam]"]


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _resnet18(classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return tvm.resnet18(num_classes=classes).eval()


def _hand_layer4(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ResNet-18's layer4 maps, computed by hand from its modules."""
    h = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    h = net.maxpool(net.relu(net.bn1(net.conv1(h))))
    return net.layer4(net.layer3(net.layer2(net.layer1(h))))


def test_cam_of_a_wrapped_resnet18_is_the_hand_computation():
    net = _resnet18()
    model = wrap_classifier(net, "layer4", mean=MEAN, std=STD, input_size=32)
    x, target = _images(2, 64), torch.tensor([1, 3])
    with torch.no_grad():
        a = _hand_layer4(net, x)
        hand = torch.stack([(net.fc.weight[c].view(-1, 1, 1) * a[i]).sum(0) for i, c in enumerate(target)])[:, None]
        up = F.interpolate(hand, size=(64, 64), mode="bilinear", align_corners=False)
        lo, hi = up.flatten(1).min(1).values.view(-1, 1, 1, 1), up.flatten(1).max(1).values.view(-1, 1, 1, 1)
        logits = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    cam = get_interpreter("cam")
    torch.testing.assert_close(cam(model, x, target, raw=True), hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cam(model, x, target), (up - lo) / (hi - lo), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(x), logits, rtol=1e-5, atol=1e-5)  # the wrapped model is the user's
    assert model.num_classes == 5 and model.stage_channels == [512]


def test_grad_of_a_wrapped_model_is_autograd_of_the_logit():
    net = _resnet18()
    model = wrap_classifier(net, mean=MEAN, std=STD, input_size=32)
    x, target = _images(3, 32, seed=1), torch.tensor([0, 4, 2])
    xi = x.clone().requires_grad_(True)
    logits = net((xi - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    (g,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), xi)
    got = get_interpreter("grad", score="logit")(model, x, target, raw=True)
    torch.testing.assert_close(got, g.abs().amax(1, keepdim=True), rtol=1e-4, atol=1e-7)


def test_adv2_against_cam_of_a_wrapped_model_stays_on_the_uint8_grid_in_the_ball():
    model = wrap_classifier(_resnet18(), mean=MEAN, std=STD, input_size=32)
    x = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(2)).float() / 255  # 2x2 CAM
    eps = 8 / 255
    attack = build_attack("adv2", interpreter="cam", warm_steps=2, steps=2,
                          framework_options=dict(eps=eps, alpha=2 / 255))
    res = attack(model, x, torch.tensor([1, 2]))
    assert float((res.x_adv * 255 - (res.x_adv * 255).round()).abs().max()) < 1e-3
    assert float((res.x_adv - x).abs().max()) <= eps + 1e-6 and float((res.x_adv - x).abs().max()) > 0
    assert 0.0 <= float(res.x_adv.min()) and float(res.x_adv.max()) <= 1.0


def test_gradcam_works_and_cam_is_refused_in_one_line_for_a_non_gap_head():
    torch.manual_seed(0)
    vgg = tvm.vgg11(num_classes=3).eval()
    with pytest.raises(ValueError, match="layer 'features' has 512 channels but the head nn.Linear takes 4096"):
        wrap_classifier(vgg, "features", input_size=32)
    tail = torch.nn.Sequential(vgg.avgpool, torch.nn.Flatten(1), vgg.classifier)
    model = wrap_classifier(vgg, "features", head=tail, input_size=32)
    x = _images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vgg(x))
    assert get_interpreter("gradcam")(model, x).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="CAM needs a GAP -> linear") as err:
        get_interpreter("cam")(model, x)
    assert "\n" not in str(err.value)


def test_wrap_refusals_are_one_line():
    net = _resnet18()
    cases = [({"feature_layer": "layer9"}, "has no layer 'layer9'"),
             ({"feature_layer": "layer3"}, "'layer3' has 256 channels"),
             ({"mean": (0.5,), "std": (1.0, 1.0)}, "one value per input channel")]
    for kwargs, fragment in cases:
        with pytest.raises(ValueError, match=fragment) as err:
            wrap_classifier(net, input_size=32, **kwargs)
        assert "\n" not in str(err.value)
    torch.manual_seed(0)
    dense = tvm.densenet121(num_classes=3).eval()  # functional ReLU after `features`: not GAP of 'features'
    with pytest.raises(ValueError, match="logits are not its last nn.Linear on the global average of 'features'"):
        wrap_classifier(dense, "features", input_size=32)


@pytest.mark.parametrize("arch", list(TORCHVISION))
def test_every_torchvision_family_builds_small_and_its_cam_layer_gives_a_map(arch):
    torch.manual_seed(0)
    model = build_classifier(arch, 4, input_size=32).eval()
    x = _images(1, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        raw = get_interpreter("cam")(model, x, raw=True)
        torch.testing.assert_close(model(x), feats.mean((2, 3)) @ model.head.weight.T + model.head.bias,
                                   rtol=1e-4, atol=1e-5)
    assert feats.shape[1] == model.stage_channels[-1] == model.head.in_features
    assert raw.shape[-2:] == feats.shape[-2:] and float(raw.abs().sum()) > 0


def _reference(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The torchvision network's logits on ``x`` normalised by hand with MEAN / STD."""
    return net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))


def test_zoo_keeps_the_local_weights_head_and_matches_torchvision(tmp_path):
    net = _resnet18(6)
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    model = build_classifier("resnet18", 6, pretrained=str(tmp_path / "r18.pt"), input_size=32, mean=MEAN,
                             std=STD).eval()
    x = _images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(net, x), rtol=1e-5, atol=1e-5)
    fresh = build_classifier("resnet18", 3, pretrained=str(tmp_path / "r18.pt"), input_size=32)
    assert torch.equal(fresh.features[0][0].weight, net.conv1.weight)  # trunk loaded, head fresh for 3 classes


# ------------------------------------------------------------------------------------------- defend evaluate --arch
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return shape_folder(tmp_path_factory.mktemp("byo") / "images", per_class=14, size=64)


def test_evaluate_arch_weights_writes_a_card_naming_arch_and_sha(folder, tmp_path):
    from defend.io import file_sha256

    weights = tmp_path / "W.pt"
    torch.save(_resnet18(2).state_dict(), weights)
    out = tmp_path / "card"
    assert main(["--arch", "resnet18", "--weights", str(weights), "--input-size", "64", "--data", f"folder:{folder}",
                 "--out", str(out), *FAST]) == 0
    card = load_card(out)
    clf = card["system"]["classifier"]
    assert clf["path"] == str(weights) and clf["sha256"] == file_sha256(weights)
    assert clf["meta"]["arch"] == "resnet18" and clf["meta"]["num_classes"] == 2


def test_robustbench_format_loads_with_its_normalisation(tmp_path):
    from defend.evaluate.system import ArchSpec, _arch_weights

    net = _resnet18(2)
    state = {f"module.model.{k}": v for k, v in net.state_dict().items()}
    state["module.mu"], state["module.sigma"] = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "rb.pt")
    weights, mean, std, notices = _arch_weights(ArchSpec("resnet18", str(tmp_path / "rb.pt"), input_size=32))
    assert mean == pytest.approx(MEAN) and std == pytest.approx(STD) and not notices
    assert "prefixed" in weights.layout
    model = build_classifier("resnet18", 2, pretrained=str(tmp_path / "rb.pt"), input_size=32, mean=mean,
                             std=std).eval()
    x = _images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(net, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="disagree with the normalisation inside"):
        _arch_weights(ArchSpec("resnet18", str(tmp_path / "rb.pt"), input_size=32, mean=[0.0] * 3, std=[1.0] * 3))


@pytest.mark.parametrize("case", ["bad_arch", "vgg", "not_fitting", "no_num_classes", "both", "arch_alone",
                                  "missing_file"])
def test_evaluate_arch_refusals_are_one_line_before_any_work(case, folder, tmp_path, capsys):
    w7 = tmp_path / "w7.pt"
    torch.save(_resnet18(7).state_dict(), w7)
    base = ["--input-size", "64", "--data", f"folder:{folder}", "--out", str(tmp_path / "out"), *FAST]
    args, fragment = {
        "bad_arch": (["--arch", "resnet9000", "--weights", str(w7)], "'resnet9000' is not a torchvision architecture"),
        "vgg": (["--arch", "vgg16", "--weights", str(w7)], "is VGG-GAP"),
        "not_fitting": (["--arch", "resnet34", "--weights", str(w7), "--num-classes", "2"],
                        "does not fit torchvision resnet34 with 2 classes"),
        "no_num_classes": (["--arch", "resnet18", "--weights", str(w7)], "give --num-classes"),
        "both": (["--arch", "resnet18", "--weights", str(w7), "--classifier", str(w7)], "not both"),
        "arch_alone": (["--arch", "resnet18"], "--arch and --weights go together"),
        "missing_file": (["--arch", "resnet18", "--weights", str(tmp_path / "nope.pt")], "no such file"),
    }[case]
    assert main([*args, *base]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
