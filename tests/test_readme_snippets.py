"""The README's drop-in snippets, run exactly as printed on a tiny model and a few batches."""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from conftest import REPO


def snippet(name: str) -> str:
    """The python block between <!-- snippet: name --> and <!-- /snippet --> in README.md."""
    match = re.search(
        rf"<!-- snippet: {name} -->\n```python\n(.*?)```\n<!-- /snippet -->",
        (REPO / "README.md").read_text(),
        re.S,
    )
    assert match, f"README.md has no snippet {name}"
    return match.group(1)


def tiny_batches(num_classes: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(16) % num_classes
    images = torch.randn(num_classes, 8, generator=g)[labels] + 0.3 * torch.randn(
        16, 8, generator=g
    )
    return [(images, labels)] * steps


def test_standalone_snippet_lowers_the_intra_term() -> None:
    torch.manual_seed(0)
    scope = {
        "num_classes": 4,
        "feat_dim": 2,
        "model": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
    }
    scope["batches"] = tiny_batches(4, 1)
    exec(snippet("standalone-sgd"), scope)
    features, labels = scope["model"](scope["batches"][0][0]), scope["batches"][0][1]
    first_intra, _ = scope["criterion"].terms(features, labels)
    first_loss = scope["criterion"](features, labels)
    scope["batches"] = tiny_batches(4, 30)
    exec(snippet("standalone-sgd"), scope)  # 30 more steps (the snippet builds fresh optimisers)
    intra, _ = scope["criterion"].terms(scope["model"](scope["batches"][0][0]), labels)
    assert intra < 0.5 * first_intra and scope["loss"] < first_loss


class FeaturesAndLogits(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features, self.classifier = nn.Linear(8, 2), nn.Linear(2, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return features, self.classifier(features)


def test_paper_snippet_moves_the_centers_by_eq_4() -> None:
    """After one step, each center is c - alpha * sum_i [y_i = j](c - x_i) / (1 + n_j), with the
    step's features (from the model before the step), computed here by a loop."""
    torch.manual_seed(0)
    model = FeaturesAndLogits(3)
    batches = tiny_batches(3, 1)
    features = model(batches[0][0])[0].detach()
    centers = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)  # CenterLoss draws the same centers
    scope = {
        "num_classes": 3,
        "feat_dim": 2,
        "model": model,
        "batches": batches,
    }  # what the text says the reader brings
    exec(snippet("cent-paper"), scope)
    labels = batches[0][1]
    for j in range(3):
        members = features[labels == j]
        expected = centers[j] - 0.5 * (centers[j] - members).sum(0) / (1 + len(members))
        torch.testing.assert_close(scope["center_loss"].centers[j], expected)
