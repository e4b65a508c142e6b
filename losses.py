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

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("xent", "cent", "standalone", "centers-apart", "center-softmax")
CENTER_ACC_LOSSES = ("standalone", "centers-apart", "center-softmax")  # no softmax on the features: accuracy by nearest center
CENTER_UPDATES = ("sgd", "paper")
# Losses whose centers only follow the features (the intra term), so the paper's update can replace
# their gradient and SGD needs only the batch's rows; centers-apart and center-softmax move all
# centers by terms of their own (dense gradients by nature).
PAPER_UPDATE_LOSSES = ("cent", "standalone")


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix of ||a_i - b_j||^2 by the expansion a^2 + b^2 - 2ab, clamped at 0.

    Rounding can make the expansion slightly negative for (nearly) equal rows; the clamp keeps
    log(1 + d) defined and no square root is ever taken, so gradients stay finite.
    """
    a2 = a.pow(2).sum(1, keepdim=True)
    b2 = a2.t() if b is a else b.pow(2).sum(1, keepdim=True).t()  # a set against itself: one pass of norms
    return torch.addmm(a2 + b2, a, b.t(), alpha=-2.0).clamp_min(0.0)


def intra_loss(features: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """Center (intra-class) term: (1/m) sum_i ||x_i - c_{y_i}||^2.

    With `sparse`, the centers are read by F.embedding(sparse=True): their gradient is then a sparse
    tensor of the m rows the batch touches (center_rows_grad), not a dense C x D matrix.
    """
    rows = F.embedding(labels, centers, sparse=sparse)  # centers[labels]; its backward is one kernel
    return F.mse_loss(features, rows, reduction="sum") / len(labels)  # one kernel for sum_i ||x_i - c_{y_i}||^2


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
    return (pair_terms * different).sum() * (-1.0 / features.shape[0])


def weighted(weight: float, term: torch.Tensor) -> torch.Tensor:
    """weight * term, without a multiplication (a kernel each way on a GPU) for the usual weight 1."""
    return term if weight == 1 else weight * term


class ClassSums(NamedTuple):
    """Per-class sums of a batch's rows v_i, listed by `index`: sums_r = sum_j [y_j = index_r] v_j,
    counts_r = n_{index_r}, the class's samples in the batch (0 for a class absent from it), and
    repeats_r, how often index_r is listed (a class's row may repeat, always with the same values)."""

    index: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor
    repeats: torch.Tensor


def class_sums(labels: torch.Tensor, values: torch.Tensor, num_classes: int) -> ClassSums:
    """The batch's per-class sums by a product with the smaller of two 0/1 matrices, so that the cost
    is m D min(m, C): with more classes than samples, the m x m same-label matrix [y_i = y_j], one row
    per sample (index y, repeats n_{y_i}); else the C x m one-hot [y_j = k], one row per class (index
    0..C-1, repeats 1). No host sync (unique and bincount size their output from the data) and
    deterministic (index_add_ on CUDA adds with atomics in any order)."""
    if num_classes > len(labels):
        same = (labels[:, None] == labels[None, :]).to(values.dtype)
        counts = same.sum(1)
        return ClassSums(labels, same @ values, counts, counts)
    classes = torch.arange(num_classes, device=labels.device)
    members = (classes[:, None] == labels[None, :]).to(values.dtype)
    return ClassSums(classes, members @ values, members.sum(1), values.new_ones(num_classes))


def put_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, apply: torch.Tensor) -> None:
    """target[index_r] <- rows_r where `apply` (a bool tensor, or one per row), else unchanged. A
    repeated index carries identical rows (class_sums), so whichever copy index_put_ writes last, the
    result is the same."""
    target.index_put_((index,), torch.where(apply, rows, target[index]))


@torch.no_grad()
def paper_center_update(
    centers: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, alpha: float, finite: torch.Tensor | None = None
) -> torch.Tensor:
    """The center loss paper's center update (Wen et al., ECCV 2016, eq. 4), in place:

        delta_c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j])
        c_j <- c_j - alpha * delta_c_j

    A class absent from the batch has delta_c_j = 0 and keeps its center. Only min(m, C) rows are
    computed and written (class_sums): the cost does not grow with the number of classes beyond the
    batch. The rows are written only where `finite` (a bool tensor; None: always) holds and the new
    rows are finite (torch.where, no host sync). Returns whether the new rows are finite. Under
    torchrun pass the global batch (utils.gather_batch), identical on every rank: every rank then
    computes the same rows and keeps the same centers without any communication.
    """
    index, sums, counts, _ = class_sums(labels, features.to(centers.dtype), len(centers))
    own, counts = centers[index], counts[:, None]
    new = own - alpha * (counts * own - sums) / (1 + counts)
    ok = torch.isfinite(new).all()
    put_rows(centers, index, new, ok if finite is None else ok & finite)
    return ok


def center_rows_grad(centers: torch.Tensor) -> ClassSums:
    """Take the sparse gradient that intra_loss(sparse=True) left in centers.grad (which becomes None)
    and return it as class_sums of its per-sample rows g_i: sums_r is the dense gradient's row index_r
    (zero for a class absent from the batch). Only min(m, C) rows, never a C x D matrix beyond the batch."""
    grad = centers.grad
    centers.grad = None
    labels, values = grad._indices()[0], grad._values()  # uncoalesced: one entry per sample, no sort or sync
    return class_sums(labels, values, len(centers))


def rows_grad_norm(grad: ClassSums) -> torch.Tensor:
    """L2 norm of the dense C x D gradient that center_rows_grad's rows stand for:
    sqrt(sum_r ||sums_r||^2 / repeats_r), each class counted once however often its row is listed."""
    return (grad.sums.pow(2).sum(1) / grad.repeats).sum().sqrt()


@torch.no_grad()
def center_sgd_step(
    centers: torch.Tensor,
    momentum_buffer: torch.Tensor,
    grad: ClassSums,
    lr: float,
    momentum: float,
    finite: torch.Tensor | None = None,
) -> torch.Tensor:
    """SGD with momentum (dampening 0, no weight decay, as torch.optim.SGD) on the rows a batch touches:

        b_j <- momentum * b_j + g_j,    c_j <- c_j - lr * b_j      for every class j in the batch

    `grad` comes from center_rows_grad (g_j = grad.sums_r for j = grad.index_r). Rows of classes
    absent from the batch (counts 0) are left alone: unlike dense SGD, where such a center keeps
    coasting by momentum * b_j, a center here moves only in the steps whose batch holds its class,
    and its buffer waits, undecayed, for the next one (lazy momentum, as in sparse embedding
    optimisers). Writes only where `finite` (None: always) holds and the new rows are finite, with no
    host sync; returns whether they are finite.
    """
    index = grad.index
    buffer = momentum * momentum_buffer[index] + grad.sums
    new = centers[index] - lr * buffer
    ok = torch.isfinite(new).all() & torch.isfinite(buffer).all()
    apply = (ok if finite is None else ok & finite) & (grad.counts > 0)[:, None]
    put_rows(momentum_buffer, index, buffer, apply)
    put_rows(centers, index, new, apply)
    return ok


def optimizer_center_step(
    optimizer: torch.optim.SGD, centers: torch.Tensor, grad: ClassSums, finite: torch.Tensor | None = None
) -> torch.Tensor:
    """center_sgd_step with the lr and momentum of the optimizer's parameter group that holds `centers`
    (so a scheduler's decay applies to them) and the momentum buffer where torch's SGD keeps it
    (optimizer.state[centers]["momentum_buffer"], saved by optimizer.state_dict), created on first use.
    The group must hold no gradient for `centers` (center_rows_grad took it), so that SGD skips them."""
    group = next(g for g in optimizer.param_groups if any(p is centers for p in g["params"]))
    state = optimizer.state[centers]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(centers)
    return center_sgd_step(centers, state["momentum_buffer"], grad, group["lr"], group["momentum"], finite)


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016): (1/m) sum_i ||x_i - c_{y_i}||^2.

    Drop-in for KaiyangZhou's CenterLoss: holds `centers` (C x D, standard normal init) and
    returns the intra term; add `weight_cent * center_loss(features, labels)` to cross-entropy.
    `sparse`: the centers' gradient is sparse (see intra_loss; for center_sgd_step or torch.optim.SparseAdam).
    """

    def __init__(self, num_classes: int, feat_dim: int, sparse: bool = False) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.sparse = sparse

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return intra_loss(features, self.centers, labels, self.sparse)


class StandaloneCenterLoss(nn.Module):
    """Standalone center loss: w_intra * intra + w_inter * inter, with no softmax.

    intra = (1/m) sum_i ||x_i - c_{y_i}||^2,
    inter = -(1/m) sum_i sum_j [y_i != y_j] log(1 + ||x_i - x_j||^2).
    `terms` returns the two unweighted terms for logging; `forward` returns the weighted total.
    `sparse`: the centers' gradient is sparse (see intra_loss).
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        weight_intra: float = 1.0,
        weight_inter: float = 0.1,
        inter_margin: float | None = None,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.weight_intra = weight_intra
        self.weight_inter = weight_inter
        self.inter_margin = inter_margin
        self.sparse = sparse

    def terms(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return intra_loss(features, self.centers, labels, self.sparse), inter_loss(features, labels, self.inter_margin)

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
    values that this objective uses. With `sparse_centers`, cent and standalone leave a sparse
    gradient on the centers, for center_rows_grad and center_sgd_step (the other losses' centers
    get dense gradients by nature and keep them).
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
        sparse_centers: bool = False,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.loss = loss
        self.weight_cent = weight_cent
        self.sparse_centers = sparse_centers and loss in PAPER_UPDATE_LOSSES
        self.criterion: nn.Module | None = None
        if loss == "cent":
            self.criterion = CenterLoss(num_classes, feat_dim, self.sparse_centers)
        elif loss == "standalone":
            self.criterion = StandaloneCenterLoss(num_classes, feat_dim, weight_intra, weight_inter, inter_margin, self.sparse_centers)
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
                total = weighted(self.criterion.weight_intra, intra) + weighted(self.criterion.weight_inter, inter)
                return total, {"intra": intra, "inter": inter}
            if self.loss == "center-softmax":
                intra, xent = self.criterion.terms(features, labels)
                return intra + xent, {"xent": xent, "intra": intra}
            xent = F.cross_entropy(logits.float(), labels)
            if self.loss == "xent":
                return xent, {"xent": xent}
            intra = self.criterion(features, labels)
            return xent + weighted(self.weight_cent, intra), {"xent": xent, "intra": intra}
