"""Our network and losses against the study's own code (../shared/seed/code, its final commit)."""

from __future__ import annotations

import copy
import importlib.util
import types
import warnings

import pytest
import torch
from conftest import REPO
from torch import nn

import losses
from models import ResNet

STUDY = REPO.parent / "shared" / "seed" / "code"


def study_module(relative: str) -> types.ModuleType:
    """A file of the study's code under its own name (its `models` and `losses` would shadow ours)."""
    path = STUDY / relative
    if not path.is_file():
        pytest.skip(f"the study's code {path} is absent")
    spec = importlib.util.spec_from_file_location(f"study_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layers(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_resnet_is_the_studys_without_its_conv_biases() -> None:
    """With the study's weights copied in, our ResNet computes the study's function. Its 976 extra
    parameters, conv biases, each feed a BatchNorm: in train mode they change nothing and get no
    gradient, so they stay at their zero init, where eval mode agrees too."""
    study = study_module("models/resnet.py").ResNet((1, 28, 28), feat_dim=2, num_classes=10)
    ours = ResNet(1, 10, 2)
    study_convs = layers(study, nn.Conv2d)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(study) - count(ours) == 976 == sum(c.bias.numel() for c in study_convs)
    assert all((c.bias == 0).all() for c in study_convs)
    with torch.no_grad():
        for kind in (nn.Conv2d, nn.BatchNorm2d, nn.Linear):
            for theirs, mine in zip(layers(study, kind), layers(ours, kind), strict=True):
                theirs.weight.normal_(std=0.3)  # the copy, not a shared init, makes them agree
                mine.weight.copy_(theirs.weight)
                if mine.bias is not None:
                    mine.bias.copy_(theirs.bias.normal_())
    x = torch.rand(8, 1, 28, 28)

    def outputs(model: nn.Module, train: bool) -> torch.Tensor:
        model.train(train)
        with torch.no_grad():
            return torch.cat(model(x), dim=1)

    biased = copy.deepcopy(study)
    with torch.no_grad():
        for c in layers(biased, nn.Conv2d):
            c.bias.normal_()
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs(copy.deepcopy(ours), True), outputs(biased, True), **close)
    torch.cat(biased(x), dim=1).square().sum().backward()
    for c in layers(biased, nn.Conv2d):  # rounding only: ~1e-6 measured
        assert c.bias.grad.abs().max() <= 1e-4 * c.weight.grad.abs().max()
    for train in (True, False):  # eval mode uses the running statistics of the train-mode pass
        torch.testing.assert_close(outputs(ours, train), outputs(study, train), **close)


def values_and_grads(loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return [loss.detach(), *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize(
    "num_classes, batch, feat_dim", [(10, 64, 2), (10, 128, 128), (100, 32, 16)]
)
def test_losses_equal_the_studys_in_float64(num_classes: int, batch: int, feat_dim: int) -> None:
    """Values and gradients (features, centers) in float64: our CenterLoss against the study's
    (KaiyangZhou's), our StandaloneCenterLoss against the study's as its loop combines them:
    weight_intra * intra - weight_inter * inter_study (its inter is sum log(1 + d), ours the negative)."""
    torch.manual_seed(0)
    features = (torch.randn(batch, feat_dim, dtype=torch.float64) * 5).requires_grad_()
    labels = torch.randint(0, num_classes, (batch,))
    sizes = dict(num_classes=num_classes, feat_dim=feat_dim, use_gpu=False)
    study_cent = study_module("losses/center_loss.py").CenterLoss(**sizes).double()
    standalone = study_module("losses/standalone_center_loss.py").StandaloneCenterLoss
    study_sa = standalone(**sizes).double()
    ours_cent = losses.CenterLoss(num_classes, feat_dim).double()
    ours_sa = losses.StandaloneCenterLoss(num_classes, feat_dim).double()
    with torch.no_grad():
        ours_cent.centers.copy_(study_cent.centers)
        ours_sa.centers.copy_(study_sa.centers)
    with warnings.catch_warnings():  # the study's addmm_(1, -2, ...) is a deprecated signature
        warnings.simplefilter("ignore", UserWarning)
        intra, inter, _ = study_sa(features, labels)
        theirs_cent = study_cent(features, labels)[0]
    pairs = [(theirs_cent, study_cent, ours_cent), (1.0 * intra - 0.1 * inter, study_sa, ours_sa)]
    for theirs, study, ours in pairs:
        want = values_and_grads(theirs, features, study.centers)
        got = values_and_grads(ours(features, labels), features, ours.centers)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    ours_intra, ours_inter = ours_sa.terms(features, labels)

    torch.testing.assert_close(ours_intra, intra, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours_inter, -inter, rtol=1e-9, atol=1e-9)
