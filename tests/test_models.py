"""models.py: output shapes, initialisation, input sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import stderr_error_line

from config import parse_args
from models import MODELS, LeNetPlusPlus, ResNet, build_model


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 24)])
@pytest.mark.parametrize("feat_dim", [2, 128])
def test_output_shapes_and_backpropagation(name, channels, size, feat_dim):
    torch.manual_seed(0)
    model = build_model(name, channels, 10, feat_dim, size)
    assert isinstance(model, {"resnet": ResNet, "lenet++": LeNetPlusPlus}[name])
    features, logits = model(torch.rand(4, channels, size, size))
    assert features.shape == (4, feat_dim) and logits.shape == (4, 10)
    assert torch.isfinite(features).all()
    torch.testing.assert_close(logits, model.classifier(features))  # the classifier of the features
    (features.sum() + logits.sum()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_build_model_refuses_an_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", 1, 10, 2, 28)


@pytest.mark.parametrize(
    "name, channels, size, layers, biased, gain",
    [("resnet", 3, 32, 18, 2, 2.0), ("lenet++", 1, 28, 8, 8, 2.0 / 1.0625)],
)
def test_kaiming_init_and_zero_biases(name, channels, size, layers, biased, gain):
    """kaiming_normal_ (fan_in): std = sqrt(gain / fan_in), gain 2 for ReLU, 2 / (1 + 0.25^2) for
    lenet++'s PReLU; large layers estimate it well. The biases there are (resnet's two linear
    layers, all of lenet++'s) start at zero."""
    torch.manual_seed(0)
    model = build_model(name, channels, 10, 128, size)
    found = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(found) == layers and sum(m.bias is not None for m in found) == biased
    assert all((m.bias == 0).all() for m in found if m.bias is not None)
    for m in (m for m in found if m.weight.numel() >= 4000):
        expected = math.sqrt(gain / m.weight[0].numel())
        assert m.weight.std().item() == pytest.approx(expected, rel=0.1), m
        assert abs(m.weight.mean().item()) < 0.1 * expected


def test_eval_mode_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = build_model("resnet", 1, 10, 2, 28).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        f_all, _ = model(x)
        f_one, _ = model(x[:1])
    torch.testing.assert_close(f_all[:1], f_one, rtol=1e-4, atol=1e-5)


def test_lenet_standardises_its_input_and_keeps_2d_features_apart():
    """Standardised input and He init: distinct images start with distinct 2-D features (PyTorch's
    default init put them within about 5e-4 of each other)."""
    torch.manual_seed(0)
    mean, std = [0.1307], [0.3081]
    model = build_model("lenet++", 1, 10, 2, 28, mean, std)
    x = (torch.rand(64, 1, 28, 28) < 0.2).float()  # MNIST-like: mostly black, some white strokes
    features, _ = model(x)
    assert features.std(0).min().item() > 0.05
    state = model.state_dict()
    assert torch.cat([state["mean"], state["std"]]).flatten().tolist() == pytest.approx(mean + std)
    plain = build_model("lenet++", 1, 10, 2, 28)  # identity standardisation: fed (x - mean) / std
    plain.load_state_dict({**state, "mean": torch.zeros(1, 1, 1, 1), "std": torch.ones(1, 1, 1, 1)})
    torch.testing.assert_close(plain((x - 0.1307) / 0.3081)[0], features)


@pytest.mark.parametrize("width", [1, 2])
def test_resnet_width_multiplies_channels_and_width_one_is_the_study_network(width):
    """Width 1 has the study's channels (16, 32, 64, 128) and 401,056 parameters less its 976 conv
    biases (tests/test_study_code.py); width w multiplies each."""
    model = build_model("resnet", 1, 10, 2, 28, **({"width": width} if width > 1 else {}))
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [width * c for c in [16] + [32] * 6 + [64] * 6 + [128] * 3]
    assert model.embed.in_features == 128 * width
    assert sum(p.numel() for p in model.parameters()) == {1: 401_056 - 976, 2: 1_596_800}[width]
    features, logits = model(torch.rand(3, 1, 28, 28))
    assert features.shape == (3, 2) and logits.shape == (3, 10)


@pytest.mark.parametrize("flags", [["--width", "0"], ["--width", "2", "--model", "lenet++"]])
def test_bad_width_is_refused(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    assert "--width" in stderr_error_line(capsys.readouterr().err)


def test_the_resnet_converted_to_syncbatchnorm_trains_and_loads_a_state_dict_without_metadata():
    """torchrun's SyncBatchNorm ResNet runs forward and backward without a process group, counting
    batches; a state dict without its _metadata (a plain dict) loads into a new model."""
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model("resnet", 1, 10, 2, 28)).train()
    features, logits = model(torch.rand(4, 1, 28, 28))
    (features.square().sum() + logits.sum()).backward()
    bns = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert bns and all(int(m.num_batches_tracked) == 1 for m in bns)
    assert all(p.grad is not None for p in model.parameters())
    state = dict(build_model("resnet", 1, 10, 2, 28).state_dict())
    fresh = build_model("resnet", 1, 10, 2, 28)
    fresh.load_state_dict(state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
