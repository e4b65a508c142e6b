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
    """A file of the study's code, loaded under its own name (its `models` and `losses` packages would shadow ours)."""
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
    """Our width-1 ResNet with the study's weights copied in computes the study's ResNet's function.
    The study's has 976 more parameters, its conv biases: each conv feeds a BatchNorm, which removes
    a per-channel constant, so in train mode they change nothing (checked at random values) and
    their gradient is zero: they stay at their zero init, where eval mode (running statistics)
    agrees too."""
    study = study_module("models/resnet.py").ResNet((1, 28, 28), feat_dim=2, num_classes=10)
    ours = ResNet(1, 10, 2)
    study_convs = layers(study, nn.Conv2d)
    assert (
        sum(p.numel() for p in study.parameters()) - sum(p.numel() for p in ours.parameters())
        == 976
    )
    assert sum(c.bias.numel() for c in study_convs) == 976 and all(
        (c.bias == 0).all() for c in study_convs
    )
    with torch.no_grad():
        for kind in (nn.Conv2d, nn.BatchNorm2d, nn.Linear):
            for theirs, mine in zip(layers(study, kind), layers(ours, kind), strict=True):
                theirs.weight.normal_(
                    std=0.3
                )  # not the shared init: the copy, not the init, must make them agree
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
    torch.testing.assert_close(
        outputs(copy.deepcopy(ours), train=True), outputs(biased, train=True), rtol=1e-5, atol=1e-5
    )
    torch.cat(biased(x), dim=1).square().sum().backward()
    for c in layers(biased, nn.Conv2d):
        assert (
            c.bias.grad.abs().max() <= 1e-4 * c.weight.grad.abs().max()
        )  # rounding only: ~1e-6 measured
    for train in (
        True,
        False,
    ):  # the eval-mode pass uses the running statistics of the train-mode pass
        torch.testing.assert_close(
            outputs(ours, train), outputs(study, train), rtol=1e-5, atol=1e-5
        )


def values_and_grads(loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return [loss.detach(), *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize(
    "num_classes, batch, feat_dim", [(10, 64, 2), (10, 128, 128), (100, 32, 16)]
)
def test_losses_equal_the_studys_in_float64(num_classes: int, batch: int, feat_dim: int) -> None:
    """Values and gradients (features and centers), float64: our CenterLoss against the study's (KaiyangZhou's),
    our StandaloneCenterLoss against the study's, combined as its training loop does:
    weight_intra * intra - weight_inter * inter_study (the study's inter is sum log(1 + d), ours its negative)."""
    torch.manual_seed(0)
    features = (torch.randn(batch, feat_dim, dtype=torch.float64) * 5).requires_grad_()
    labels = torch.randint(0, num_classes, (batch,))
    with (
        warnings.catch_warnings()
    ):  # the study's addmm_(1, -2, ...) is torch's deprecated signature
        warnings.simplefilter("ignore", UserWarning)
        study_cent = (
            study_module("losses/center_loss.py")
            .CenterLoss(num_classes, feat_dim, use_gpu=False)
            .double()
        )
        study_standalone = study_module("losses/standalone_center_loss.py").StandaloneCenterLoss(
            num_classes, feat_dim, use_gpu=False
        )
        study_standalone.double()
        ours_cent, ours_standalone = (
            losses.CenterLoss(num_classes, feat_dim).double(),
            losses.StandaloneCenterLoss(num_classes, feat_dim),
        )
        ours_standalone.double()
        with torch.no_grad():
            ours_cent.centers.copy_(study_cent.centers)
            ours_standalone.centers.copy_(study_standalone.centers)

        want = values_and_grads(study_cent(features, labels)[0], features, study_cent.centers)
        got = values_and_grads(ours_cent(features, labels), features, ours_cent.centers)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)

        intra, inter, _ = study_standalone(features, labels)
        want = values_and_grads(1.0 * intra - 0.1 * inter, features, study_standalone.centers)
        got = values_and_grads(ours_standalone(features, labels), features, ours_standalone.centers)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
        ours_intra, ours_inter = ours_standalone.terms(features, labels)
        torch.testing.assert_close(ours_intra, intra, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours_inter, -inter, rtol=1e-9, atol=1e-9)
