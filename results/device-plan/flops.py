"""FLOP per image of the default ResNet, counted by torch.utils.flop_counter, into flops.json.

python results/device-plan/flops.py   (from the repository root; about half a minute on a CPU)"""

import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from models import build_model  # noqa: E402

BATCH = 4


def count(channels: int, side: int, train: bool) -> float:
    """FLOP per image: forward and backward (train) or forward alone (evaluation), feat_dim 2."""
    model = build_model("resnet", channels, 10, 2, side)
    images = torch.randn(BATCH, channels, side, side)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
        features, _ = model(images)
        if train:
            features.sum().backward()
    return counter.get_total_flops() / BATCH


if __name__ == "__main__":
    flops = {
        f"{kind}_{side}x{side}x{channels}": count(channels, side, kind == "train")
        for channels, side in ((1, 28), (3, 32))
        for kind in ("train", "eval")
    }
    flops["torch"] = torch.__version__
    (Path(__file__).parent / "flops.json").write_text(json.dumps(flops, indent=1) + "\n")
    print(flops)
