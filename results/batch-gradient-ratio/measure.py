"""Per-feature gradient of the standalone loss's two terms at batch 128 and 1024 (README's FAQ).

For each feature x_i of a batch of MNIST test images, ||d term / d x_i||; printed: the batch mean of
the inter term's norm over the intra term's, unweighted and with the default weights (1.0, 0.1).
Features of our ResNet at its seeded init, standard normal centers (as main.py starts), seeds 0-2.
    python results/batch-gradient-ratio/measure.py [DATA_DIR]   (default ../shared/data)
"""

import sys

import torch

sys.path.insert(0, ".")
from datasets import load_dataset  # noqa: E402
from losses import inter_loss, intra_loss  # noqa: E402
from models import ResNet  # noqa: E402

data = load_dataset(
    "mnist", sys.argv[1] if len(sys.argv) > 1 else "../shared/data", download=False
).test
print("feat_dim batch seed  |inter|/|intra| per feature  weighted (0.1 inter)")
for feat_dim in (2, 128):
    for batch in (128, 1024):
        for seed in range(3):
            torch.manual_seed(seed)
            model, centers = ResNet(1, 10, feat_dim), torch.randn(10, feat_dim)
            index = torch.randperm(len(data))[:batch]
            with torch.no_grad():
                features = model(data.images[index].float() / 255)[0]
            features.requires_grad_()
            labels = data.labels[index]
            (g_intra,) = torch.autograd.grad(intra_loss(features, centers, labels), features)
            (g_inter,) = torch.autograd.grad(inter_loss(features, labels), features)
            ratio = (g_inter.norm(dim=1).mean() / g_intra.norm(dim=1).mean()).item()
            print(f"{feat_dim:8d} {batch:5d} {seed:4d}  {ratio:26.1f}  {0.1 * ratio:8.1f}")
