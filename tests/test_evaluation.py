"""Evaluation computes in float32 under every --amp, so that acc and the metrics compare across settings."""

from __future__ import annotations

import types

import pytest
import torch

from datasets import ImageData
from evaluation import embed, eval_logits


class Net(torch.nn.Module):
    """Features and logits as the project's models return them: logits = classifier(features)."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.classifier = torch.nn.Linear(16, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x.flatten(1))
        return f, self.classifier(f)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_embed_is_float32_under_autocast(dtype) -> None:
    torch.manual_seed(0)
    model = Net()
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)
    run = types.SimpleNamespace(model=model, device=torch.device("cpu"), channels_last=False)
    with torch.autocast("cpu", dtype=dtype):  # a caller under --amp: embed must leave it
        features = embed(run, ImageData(images, torch.zeros(40, dtype=torch.long)))
    with torch.no_grad():
        want_features, want_logits = model(images.float().div(255))
    assert features.dtype == torch.float32 and torch.equal(features, want_features)
    # logits a chunk at a time, for a loss that reads them
    run.args = types.SimpleNamespace(loss="xent")
    assert torch.equal(eval_logits(run, features), want_logits)
    run.args.loss = "standalone"
    assert eval_logits(run, features) is None
    assert model.training  # back in train mode
