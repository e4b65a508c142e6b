"""Feature extractors of the study. Every model's forward returns (features, logits)."""

from collections.abc import Sequence

import torch
import torch.nn as nn

MODELS = ("resnet", "lenet++")
# Smallest image side each model takes: the resnet's unpadded 3x3 stem, lenet++'s three 2x2 poolings.
MIN_SIDE = {"resnet": 3, "lenet++": 8}
PRELU_INIT = 0.25  # nn.PReLU's initial negative slope


class LeNetPlusPlus(nn.Module):
    """LeNet++ of Wen et al. (ECCV 2016): three pairs of 5x5 convolutions (32, 64, 128 channels)
    with PReLU, 2x2 max-pooling after each pair, a linear layer to feat_dim with PReLU (the
    features) and a linear classifier. Any input of side >= 8 works (three poolings leave side // 8).

    With no batch normalisation, input and initialisation keep the signal alive: x' = (x - mean) / std per
    channel with the train set's statistics (buffers; identity when not given), and He initialisation for
    PReLU's slope 0.25, std = sqrt(2 / ((1 + 0.25^2) fan_in)), zero biases (torch's default shrinks the
    signal until all 2-D features lie within about 5e-4 of each other)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        feat_dim: int,
        image_size: int = 28,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean or [0.0] * in_channels).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or [1.0] * in_channels).view(1, -1, 1, 1))
        layers: list[nn.Module] = []
        widths = (in_channels, 32, 32, 64, 64, 128, 128)
        for i in range(6):  # a pooling after each pair
            layers += [nn.Conv2d(widths[i], widths[i + 1], 5, padding=2), nn.PReLU()]
            layers += [nn.MaxPool2d(2)] * (i % 2)
        self.body = nn.Sequential(*layers)
        side = image_size // 8
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(128 * side * side, feat_dim), nn.PReLU())
        self.classifier = nn.Linear(feat_dim, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=PRELU_INIT, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(self.body((x - self.mean) / self.std))
        return features, self.classifier(features)


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1 conv shortcut on shape change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(torch.relu(self.bn2(self.conv1(out)))) + shortcut


class ResNet(nn.Module):
    """The study's small pre-activation ResNet: 3x3 stem conv (no padding) to 16 channels, five
    one-block groups of widths 32, 32, 64, 64, 128 with strides 1, 2, 1, 2, 1, BN-ReLU, global
    average pooling, a linear layer to feat_dim (the features) and a linear classifier. `width`
    multiplies every channel count (1: the study's network; 4 has about 16 times its weights)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        feat_dim: int,
        image_size: int = 28,
        width: int = 1,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16 * width, 3, bias=False)
        widths = [16 * width] + [base * width for base in (32, 32, 64, 64, 128)]
        self.blocks = nn.Sequential(*map(PreActBlock, widths, widths[1:], (1, 2, 1, 2, 1)))
        self.head = nn.Sequential(
            nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.embed = nn.Linear(widths[-1], feat_dim)
        self.classifier = nn.Linear(feat_dim, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(self.head(self.blocks(self.stem(x))))
        return features, self.classifier(features)


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    feat_dim: int,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int = 1,
) -> nn.Module:
    """Model by CLI name: 'resnet' (the study's, default; it takes the pixels as they are; `width`
    multiplies its channels) or 'lenet++' (standardises its input by the per-channel `mean` and
    `std`, if given)."""
    if name == "resnet":
        return ResNet(in_channels, num_classes, feat_dim, image_size, width)
    if name == "lenet++":
        return LeNetPlusPlus(in_channels, num_classes, feat_dim, image_size, mean, std)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
