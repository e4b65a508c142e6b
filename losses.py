"""Losses of the standalone center loss study, each a small module whose docstring states its formula,
usable in any training loop, and the centers' updates. Centers follow KaiyangZhou's pytorch-center-loss:
an nn.Parameter of shape (num_classes, feat_dim), standard normal init. m: batch size, C: classes.
"""

import functools
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("xent", "cent", "standalone", "centers-apart", "center-softmax")
# no softmax on the features: accuracy by nearest center
CENTER_ACC_LOSSES = ("standalone", "centers-apart", "center-softmax")
CENTER_UPDATES = ("sgd", "paper")
# Which of the logged terms ("xent", "intra", "inter") an objective has: Objective.terms_used.
TERMS_USED = {"xent": ("xent",), "cent": ("xent", "intra"), "center-softmax": ("xent", "intra")}
# Centers that only follow the features (intra): the paper's update can replace their gradient, and SGD needs only the batch's rows.
PAPER_UPDATE_LOSSES = ("cent", "standalone")


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """Matrix of ||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i.b_j, clamped at 0 (rounding can make
    it slightly negative for equal rows; no square root is taken, so gradients stay finite)."""
    a2 = a.pow(2).sum(1, keepdim=True)
    b2 = a2.t() if b is a else b.pow(2).sum(1, keepdim=True).t()
    return torch.addmm(a2 + b2, a, b.t(), alpha=-2.0).clamp_min(0.0)


def intra_loss(features: Tensor, centers: Tensor, labels: Tensor) -> Tensor:
    """Center term: (1/m) sum_i ||x_i - c_{y_i}||^2."""
    # embedding: centers[labels]
    return F.mse_loss(features, F.embedding(labels, centers), reduction="sum") / len(labels)


def inter_loss(features: Tensor, labels: Tensor, margin: float | None = None) -> Tensor:
    """Log push: -(1/m) sum_i sum_j [y_i != y_j] log(1 + min(||x_i - x_j||^2, margin)), margin None: no min.

    The study's README writes log(d); its code, and this function, log(1 + d): zero, not -inf, for
    coincident features. The margin, the study's remedy for the unbounded term, stops far pairs' push."""
    distances = squared_distances(features, features)
    if margin is not None:
        distances = distances.clamp_max(margin)
    different = labels[:, None] != labels[None, :]
    return (torch.log1p(distances) * different).sum() * (-1.0 / features.shape[0])


def in_float32(method: Callable) -> Callable:
    """Run method(self, features, labels) outside autocast, 16-bit features upcast: in 16 bits a^2 + b^2 - 2ab
    overflows (fp16: NaN at norm ~340) or loses digits (bf16). torch.amp.custom_fwd fixes the device type in advance."""

    @functools.wraps(method)
    def wrapper(self: nn.Module, features: Tensor, labels: Tensor):
        features = features.to(torch.promote_types(features.dtype, torch.float32))
        with torch.autocast(features.device.type, enabled=False):
            return method(self, features, labels)

    return wrapper


@torch.no_grad()
def paper_center_update(
    centers: Tensor, features: Tensor, labels: Tensor, alpha: float, apply: Tensor | None = None
) -> Tensor:
    """The center loss paper's center update (Wen et al., ECCV 2016, eq. 4), in place:

        delta_c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j]),    c_j <- c_j - alpha * delta_c_j

    No library optimiser does this: eq. 4 is not a gradient step (it divides by 1 + n_j and ignores the loss weight).
    Only the batch's rows change, class sums by the m x m same-label matrix: cost m^2 D whatever C, no
    host sync (torch.unique would), no atomics. Rows are written only where `apply` (bool tensor; None:
    always) holds and the new rows are finite; returns whether they are.
    """
    same = (labels[:, None] == labels[None, :]).to(centers.dtype)
    counts = same.sum(1, keepdim=True)
    own = centers[labels]
    new = own - alpha * (counts * own - same @ features.to(centers.dtype)) / (1 + counts)
    ok = torch.isfinite(new).all()
    # A class in the batch k times is written k times with the same row: whichever write lands, the result is the same.
    centers.index_put_((labels,), torch.where(ok if apply is None else ok & apply, new, own))
    return ok


class RowSGD(torch.optim.Optimizer):
    """SGD with momentum (dampening 0, as torch.optim.SGD) on the rows of one parameter that a batch reaches:

        g_j = sum_{i: r_i = j} G_i,    b_j <- momentum * b_j + g_j,    c_j <- c_j - lr * b_j        for each j in r

    step(r, G, apply): r the batch's m row indices (repeats allowed), G their m x D gradients (CenterLoss(sparse=True):
    labels, rows.grad). A row absent from r keeps value and buffer (lazy momentum; dense SGD would move it by
    momentum * b_j): a step costs m x D, not C x D, and every size is fixed by m, so nothing waits for the host
    (coalescing a sparse gradient on CUDA would). Hand-written because no library optimiser keeps lazy per-row momentum:
    torch.optim.SGD's sparse momentum buffer grows every step and SparseAdam is Adam. Rows
    are written only where `apply` (bool tensor; None: always) holds and the new rows are finite; returns whether they are.
    """

    def __init__(self, param: Tensor, lr: float, momentum: float = 0.0) -> None:
        super().__init__([param], {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, rows: Tensor, grads: Tensor, apply: Tensor | None = None) -> Tensor:
        group = self.param_groups[0]
        p, momentum = group["params"][0], group["momentum"]
        # where a row's first repeat sits in sorted order
        first = torch.searchsorted(rows.sort().values, rows)
        # g_j, at each of j's repeats
        update = torch.zeros_like(grads).index_add_(0, first, grads).index_select(0, first)
        # one dense buffer, made at the first step (a state_dict from before it has none)
        if momentum:
            buffer = self.state[p].get("momentum_buffer")
            if buffer is None:
                buffer = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            update = momentum * (held := buffer.index_select(0, rows)) + update
        new = (old := p.index_select(0, rows)) - group["lr"] * update
        ok = torch.isfinite(new).all()  # a finite new row has a finite buffer row (lr > 0)
        write = ok if apply is None else ok & apply
        # A row repeated in r is written once per repeat, each time with the same value.
        if momentum:
            buffer.index_copy_(0, rows, torch.where(write, update, held))
        p.index_copy_(0, rows, torch.where(write, new, old))
        return ok


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016): (1/m) sum_i ||x_i - c_{y_i}||^2, in float32 under autocast.
    Drop-in for KaiyangZhou's CenterLoss: add `weight_cent * center_loss(features, labels)` to the
    cross-entropy. `sparse` (many classes): the loss reads a leaf copy of the batch's centers, `rows`, so
    backward leaves their gradient in rows.grad (m x D) in place of the centers' (C x D); step the centers
    with RowSGD(criterion.centers, ...).step(criterion.labels, criterion.rows.grad)."""

    def __init__(self, num_classes: int, feat_dim: int, sparse: bool = False) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.sparse = sparse
        # sparse: the last forward's labels and copy of their centers
        self.labels = self.rows = None

    def intra(self, features: Tensor, labels: Tensor) -> Tensor:
        """intra_loss(features, centers, labels); sparse: on a copy of the batch's rows (the class docstring)."""
        if not self.sparse:
            return intra_loss(features, self.centers, labels)
        self.labels, self.rows = labels, self.centers.detach()[labels].requires_grad_()
        # rows[i]: x_i's center
        return intra_loss(features, self.rows, torch.arange(len(labels), device=labels.device))

    forward = in_float32(intra)


class TwoTerms(nn.Module):
    """Two terms: forward = weigh(*terms(features, labels)) = w_intra * intra + w_inter * inter (1, 1 unless set)."""

    weight_intra = weight_inter = 1.0

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return self.weigh(*self.terms(features, labels))

    def weigh(self, intra: Tensor, inter: Tensor) -> Tensor:
        return self.weight_intra * intra + self.weight_inter * inter


class StandaloneCenterLoss(TwoTerms, CenterLoss):
    """Standalone center loss, no softmax, in float32 under autocast: TwoTerms with terms (intra_loss,
    inter_loss with inter_margin) = (intra, inter). `sparse`: see CenterLoss."""

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        weight_intra: float = 1.0,
        weight_inter: float = 0.1,
        inter_margin: float | None = None,
        sparse: bool = False,
    ) -> None:
        super().__init__(num_classes, feat_dim, sparse)
        self.weight_intra, self.weight_inter = weight_intra, weight_inter
        self.inter_margin = inter_margin

    @in_float32
    def terms(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.intra(features, labels), inter_loss(features, labels, self.inter_margin)


class CentersApartLoss(TwoTerms):
    """The study's first alternative ("directly enlarge the class centers"), in float32 under autocast:
    total = w_intra * intra + w_inter * inter, with (alpha small, for numerical stability)

    intra = (1/m) sum_i exp(alpha * ||x_i - c_{y_i}||^2),   inter = -(1/C) sum_{i != j} log(1 + ||c_i - c_j||^2)
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        weight_intra: float = 1.0,
        weight_inter: float = 0.1,
        alpha: float = 0.05,
    ) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.weight_intra, self.weight_inter, self.alpha = weight_intra, weight_inter, alpha

    @in_float32
    def terms(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        intra = torch.exp(self.alpha * (features - self.centers[labels]).pow(2).sum(1)).mean()
        n = self.centers.shape[0]
        apart = ~torch.eye(n, dtype=torch.bool, device=features.device)
        inter = torch.log1p(squared_distances(self.centers, self.centers)) * apart
        return intra, -inter.sum() / n


class CenterSoftmaxLoss(TwoTerms):
    """The study's second alternative, in float32 under autocast: intra plus the cross-entropy of a linear
    classifier on the centers, center k labelled k: total = intra + (1/C) sum_k CE(W c_k + b, k)."""

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.classifier = nn.Linear(feat_dim, num_classes)

    @in_float32
    def terms(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        own = torch.arange(self.centers.shape[0], device=self.centers.device)
        xent = F.cross_entropy(self.classifier(self.centers), own)
        return intra_loss(features, self.centers, labels), xent


class Objective(nn.Module):
    """The study's objectives: forward(features, logits, labels) -> (total, terms), terms the unweighted
    "xent", "intra", "inter" it uses, in float32 under autocast. xent = CE(logits, y); cent = xent +
    weight_cent * intra; standalone, centers-apart and center-softmax: their modules (logits unused).
    `sparse_centers`: cent's and standalone's centers take their gradient on the batch's rows (CenterLoss, RowSGD).
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
        self.loss, self.weight_cent = loss, weight_cent
        self.terms_used = TERMS_USED.get(loss, ("intra", "inter"))
        self.sparse_centers = sparse = sparse_centers and loss in PAPER_UPDATE_LOSSES
        size, weights = (num_classes, feat_dim), (weight_intra, weight_inter)
        make = {
            "cent": lambda: CenterLoss(*size, sparse),
            "standalone": lambda: StandaloneCenterLoss(*size, *weights, inter_margin, sparse),
            "centers-apart": lambda: CentersApartLoss(*size, *weights, alpha),
            "center-softmax": lambda: CenterSoftmaxLoss(*size),
        }
        self.criterion: nn.Module | None = make[loss]() if loss in make else None

    @property
    def centers(self) -> Tensor | None:
        return None if self.criterion is None else self.criterion.centers

    def forward(
        self, features: Tensor, logits: Tensor, labels: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.loss in CENTER_ACC_LOSSES:
            intra, other = self.criterion.terms(features, labels)
            name = "xent" if self.loss == "center-softmax" else "inter"
            return self.criterion.weigh(intra, other), {"intra": intra, name: other}
        # float32 logits: autocast runs cross-entropy in float32 anyway
        xent = F.cross_entropy(logits.float(), labels)
        if self.loss == "xent":
            return xent, {"xent": xent}
        intra = self.criterion(features, labels)
        return xent + self.weight_cent * intra, {"xent": xent, "intra": intra}
