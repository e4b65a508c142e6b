"""Losses of the standalone center loss study.

For a batch of m features x_i (dimension D) with labels y_i and learnable class centers c_k:

    intra = (1/m) sum_i ||x_i - c_{y_i}||^2                                  (Wen et al., ECCV 2016)
    inter = -(1/m) sum_i sum_j [y_i != y_j] log(1 + ||x_i - x_j||^2)
    standalone = w_intra * intra + w_inter * inter                           (no softmax at all)

The center-loss module follows KaiyangZhou's pytorch-center-loss
(https://github.com/KaiyangZhou/pytorch-center-loss): centers are an nn.Parameter of shape
(num_classes, feat_dim) drawn from a standard normal and optimised with the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("xent", "cent", "standalone", "centers-apart", "center-softmax")
CENTER_ACC_LOSSES = ("standalone", "centers-apart", "center-softmax")  # no softmax on the features: accuracy by nearest center
CENTER_UPDATES = ("sgd", "paper")
# Losses whose centers only follow the features (the intra term), so the paper's update can replace
# their gradient; centers-apart and center-softmax move the centers by terms of their own.
PAPER_UPDATE_LOSSES = ("cent", "standalone")


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix of ||a_i - b_j||^2 by the expansion a^2 + b^2 - 2ab, clamped at 0.

    Rounding can make the expansion slightly negative for (nearly) equal rows; the clamp keeps
    log(1 + d) defined and no square root is ever taken, so gradients stay finite.
    """
    a2 = a.pow(2).sum(1, keepdim=True)
    b2 = b.pow(2).sum(1, keepdim=True).t()
    return (a2 + b2 - 2.0 * a @ b.t()).clamp_min(0.0)


def intra_loss(features: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Center (intra-class) term: (1/m) sum_i ||x_i - c_{y_i}||^2."""
    return (features - centers[labels]).pow(2).sum(1).mean()


def inter_loss(features: torch.Tensor, labels: torch.Tensor, margin: float | None = None) -> torch.Tensor:
    """Log inter-class push: -(1/m) sum_i sum_j [y_i != y_j] log(1 + ||x_i - x_j||^2).

    The study's README writes log(d); its code, and this function, use log(1 + d) so the term is
    finite (and zero) when two features coincide. With `margin`, each pair's squared distance is
    truncated at it (min(d, margin)): pairs farther apart are no longer pushed, the study's
    alternative remedy for the unbounded term.
    """
    different = labels[:, None] != labels[None, :]
    distances = squared_distances(features, features)
    if margin is not None:
        distances = distances.clamp_max(margin)
    pair_terms = torch.log1p(distances)
    return -(pair_terms * different).sum() / features.shape[0]


@torch.no_grad()
def paper_center_update(centers: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, alpha: float) -> None:
    """The center loss paper's center update (Wen et al., ECCV 2016, eq. 4), in place:

        delta_c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j])
        c_j <- c_j - alpha * delta_c_j

    A class absent from the batch has delta_c_j = 0 and keeps its center. The per-class sums are a
    product with the batch's one-hot label mask: no host sync (bincount would size its output from
    max(labels), a sync on CUDA) and, unlike index_add_'s atomics on CUDA, deterministic. Under
    torchrun pass the global batch (utils.gather_batch), identical on every rank: every rank then
    computes the same sums and keeps the same centers without any communication.
    """
    classes = torch.arange(centers.shape[0], device=labels.device)
    members = (labels[None, :] == classes[:, None]).to(centers.dtype)  # C x m: [y_i = j]
    counts = members.sum(1, keepdim=True)
    delta = (counts * centers - members @ features.to(centers.dtype)) / (1 + counts)
    centers.sub_(alpha * delta)


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016): (1/m) sum_i ||x_i - c_{y_i}||^2.

    Drop-in for KaiyangZhou's CenterLoss: holds `centers` (C x D, standard normal init) and
    returns the intra term; add `weight_cent * center_loss(features, labels)` to cross-entropy.
    """

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return intra_loss(features, self.centers, labels)


class StandaloneCenterLoss(nn.Module):
    """Standalone center loss: w_intra * intra + w_inter * inter, with no softmax.

    intra = (1/m) sum_i ||x_i - c_{y_i}||^2,
    inter = -(1/m) sum_i sum_j [y_i != y_j] log(1 + ||x_i - x_j||^2).
    `terms` returns the two unweighted terms for logging; `forward` returns the weighted total.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        weight_intra: float = 1.0,
        weight_inter: float = 0.1,
        inter_margin: float | None = None,
    ) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.weight_intra = weight_intra
        self.weight_inter = weight_inter
        self.inter_margin = inter_margin

    def terms(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return intra_loss(features, self.centers, labels), inter_loss(features, labels, self.inter_margin)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        intra, inter = self.terms(features, labels)
        return self.weight_intra * intra + self.weight_inter * inter


class CentersApartLoss(nn.Module):
    """The study's first alternative ("directly enlarge the class centers"):

    intra = (1/m) sum_i exp(alpha * ||x_i - c_{y_i}||^2)
    inter = -(1/n_c) sum_{i != j} log(1 + ||c_i - c_j||^2)        (pairs of centers, not samples)
    total = w_intra * intra + w_inter * inter

    The push acts on the n_c centers, so its cost does not grow with the batch. alpha scales the
    squared distance before the exponential for numerical stability. As for the main loss, log(1 + d)
    replaces the README's log(d). The study reports it as good as the main loss on MNIST and failing
    on Fashion-MNIST and CIFAR-10.
    """

    def __init__(self, num_classes: int, feat_dim: int, weight_intra: float = 1.0, weight_inter: float = 0.1, alpha: float = 0.05) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.weight_intra, self.weight_inter, self.alpha = weight_intra, weight_inter, alpha

    def terms(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        intra = torch.exp(self.alpha * (features - self.centers[labels]).pow(2).sum(1)).mean()
        n = self.centers.shape[0]
        apart = ~torch.eye(n, dtype=torch.bool, device=features.device)
        inter = -(torch.log1p(squared_distances(self.centers, self.centers)) * apart).sum() / n
        return intra, inter

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        intra, inter = self.terms(features, labels)
        return self.weight_intra * intra + self.weight_inter * inter


class CenterSoftmaxLoss(nn.Module):
    """The study's second alternative: the center loss plus the softmax cross-entropy of a linear
    classifier applied to the centers themselves, center k labelled k:

    total = intra + CE(W c_k + b, k) averaged over the n_c centers

    Separating the centers costs n_c, not the batch size. The study found it worse than center loss
    with softmax: the centers become separable while staying close to each other.
    """

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.classifier = nn.Linear(feat_dim, num_classes)

    def terms(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        own = torch.arange(self.centers.shape[0], device=self.centers.device)
        return intra_loss(features, self.centers, labels), F.cross_entropy(self.classifier(self.centers), own)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(self.terms(features, labels))


class Objective(nn.Module):
    """The three objectives of the study, with every unweighted term returned for logging.

    xent:           cross-entropy(logits, y)
    cent:           cross-entropy(logits, y) + weight_cent * intra
    standalone:     weight_intra * intra + weight_inter * inter   (logits unused)
    centers-apart:  CentersApartLoss                             (logits unused)
    center-softmax: CenterSoftmaxLoss                            (logits unused; its xent is on the centers)

    forward returns (total, terms) where terms maps "xent", "intra", "inter" to the unweighted
    values that this objective uses.
    """

    def __init__(
        self,
        loss: str,
        num_classes: int,
        feat_dim: int,
        weight_cent: float = 1.0,
        weight_intra: float = 1.0,
        weight_inter: float = 0.1,
        inter_margin: float | None = None,
        alpha: float = 0.05,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.loss = loss
        self.weight_cent = weight_cent
        self.criterion: nn.Module | None = None
        if loss == "cent":
            self.criterion = CenterLoss(num_classes, feat_dim)
        elif loss == "standalone":
            self.criterion = StandaloneCenterLoss(num_classes, feat_dim, weight_intra, weight_inter, inter_margin)
        elif loss == "centers-apart":
            self.criterion = CentersApartLoss(num_classes, feat_dim, weight_intra, weight_inter, alpha)
        elif loss == "center-softmax":
            self.criterion = CenterSoftmaxLoss(num_classes, feat_dim)

    @property
    def terms_used(self) -> tuple[str, ...]:
        """Which of the logged terms ("xent", "intra", "inter") this objective has."""
        return {"xent": ("xent",), "cent": ("xent", "intra"), "center-softmax": ("xent", "intra")}.get(self.loss, ("intra", "inter"))

    @property
    def centers(self) -> torch.Tensor | None:
        return None if self.criterion is None else self.criterion.centers

    def forward(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Losses run in float32 even when a caller wraps them in autocast (which would run the
        # distance matmuls in 16 bits): the pairwise log terms lose too much there.
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            if self.loss in ("standalone", "centers-apart"):
                intra, inter = self.criterion.terms(features, labels)
                total = self.criterion.weight_intra * intra + self.criterion.weight_inter * inter
                return total, {"intra": intra, "inter": inter}
            if self.loss == "center-softmax":
                intra, xent = self.criterion.terms(features, labels)
                return intra + xent, {"xent": xent, "intra": intra}
            xent = F.cross_entropy(logits.float(), labels)
            if self.loss == "xent":
                return xent, {"xent": xent}
            intra = self.criterion(features, labels)
            return xent + self.weight_cent * intra, {"xent": xent, "intra": intra}
