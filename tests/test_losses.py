"""losses.py against plain Python double loops, gradchecks, coincident points, margins, Objective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from losses import (
    LOSSES,
    CenterLoss,
    CentersApartLoss,
    CenterSoftmaxLoss,
    Objective,
    StandaloneCenterLoss,
    inter_loss,
    intra_loss,
    paper_center_update,
    squared_distances,
)


def ref_sqdist(u: list[float], v: list[float]) -> float:
    return sum((a - b) ** 2 for a, b in zip(u, v))


def ref_intra(features: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> float:
    x, c, y = features.double().tolist(), centers.double().tolist(), labels.tolist()
    return sum(ref_sqdist(x[i], c[y[i]]) for i in range(len(x))) / len(x)


def ref_inter(features: torch.Tensor, labels: torch.Tensor, margin: float | None = None) -> float:
    x, y, cap = features.double().tolist(), labels.tolist(), math.inf if margin is None else margin
    pairs = [(i, j) for i in range(len(x)) for j in range(len(x)) if y[i] != y[j]]
    return -sum(math.log1p(min(ref_sqdist(x[i], x[j]), cap)) for i, j in pairs) / len(x)


LABEL_PATTERNS = {
    "balanced": [0, 1, 2, 3, 0, 1, 2, 3],
    "unbalanced": [0, 0, 0, 0, 0, 1, 2, 2],
    "all_same": [2] * 8,
    "all_distinct": [0, 1, 2, 3, 4, 5, 6, 7],
    "two_classes": [1, 0, 1, 0, 1, 0, 1, 0],
}
NUM_CLASSES = 8
DTYPES = {torch.float64: dict(rel=1e-10, abs=1e-10), torch.float32: dict(rel=1e-4, abs=1e-4)}


def sample(dtype: torch.dtype, labels: list[int], dim: int = 3, seed: int = 0, scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    features = (torch.randn(len(labels), dim, generator=g, dtype=torch.float64) * scale).to(dtype)
    centers = torch.randn(NUM_CLASSES, dim, generator=g, dtype=torch.float64).to(dtype)
    return features, centers, torch.tensor(labels, dtype=torch.int64)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["f64", "f32"])
@pytest.mark.parametrize("pattern", list(LABEL_PATTERNS))
def test_distances_terms_and_modules_match_double_loops(dtype, pattern):
    """squared_distances, intra, inter (0 for one class, else negative: it pushes apart), and the
    modules' totals (weights 0.7 and 0.3 for the standalone loss) in the input's dtype."""
    labels, tol = LABEL_PATTERNS[pattern], DTYPES[dtype]
    for seed, dim in ((0, 2), (1, 5)):
        features, centers, y = sample(dtype, labels, dim, seed)
        d = squared_distances(features, centers)
        want = [[ref_sqdist(x, c) for c in centers.tolist()] for x in features.tolist()]
        assert d.dtype == dtype and d.tolist() == [pytest.approx(row, **tol) for row in want]
        intra, inter = intra_loss(features, centers, y), inter_loss(features, y)
        assert intra.dtype == inter.dtype == dtype and intra.shape == inter.shape == ()
        assert intra.item() == pytest.approx(ref_intra(features, centers, y), **tol)
        assert inter.item() == pytest.approx(ref_inter(features, y), **tol)
        assert (inter.item() == 0.0) == (pattern == "all_same")
        cent = CenterLoss(NUM_CLASSES, dim).to(dtype)
        sa = StandaloneCenterLoss(NUM_CLASSES, dim, weight_intra=0.7, weight_inter=0.3).to(dtype)
        for module in (cent, sa):
            with torch.no_grad():
                module.centers.copy_(centers)
        assert cent(features, y).item() == pytest.approx(ref_intra(features, centers, y), **tol)
        want = 0.7 * ref_intra(features, centers, y) + 0.3 * ref_inter(features, y)
        assert sa(features, y).item() == pytest.approx(want, **tol)


@pytest.mark.parametrize("pattern", ["balanced", "unbalanced", "all_distinct", "all_same"])
def test_gradients_of_intra_and_inter(pattern):
    """gradcheck of intra, inter and inter with a margin; d intra / d x_i = 2 (x_i - c_{y_i}) / m,
    and the centers get the opposite, summed per class."""
    features, centers, y = sample(torch.float64, LABEL_PATTERNS[pattern], 3, seed=11)
    features, centers = features.requires_grad_(), centers.requires_grad_()
    assert torch.autograd.gradcheck(lambda f, c: intra_loss(f, c, y), (features, centers))
    assert torch.autograd.gradcheck(lambda f: inter_loss(f, y), (features,))
    assert torch.autograd.gradcheck(lambda f: inter_loss(f, y, margin=3.0), (features,))
    intra_loss(features, centers, y).backward()
    expected = 2 * (features.detach() - centers.detach()[y]) / len(y)
    torch.testing.assert_close(features.grad, expected)
    torch.testing.assert_close(centers.grad, torch.zeros_like(centers).index_add_(0, y, -expected))


@pytest.mark.parametrize("module_cls", [CenterLoss, StandaloneCenterLoss])
def test_gradcheck_module_totals(module_cls):
    """gradcheck of the total through given centers; the module's own centers get that gradient."""
    features, _, y = sample(torch.float64, LABEL_PATTERNS["unbalanced"], 3, seed=5)
    torch.manual_seed(1)
    module = module_cls(NUM_CLASSES, 3).double()
    inputs = (features.requires_grad_(), module.centers.detach().clone().requires_grad_())
    total = lambda f, c: functional_call(module, {"centers": c}, (f, y))  # noqa: E731
    assert torch.autograd.gradcheck(total, inputs)
    module(features, y).backward()
    torch.testing.assert_close(module.centers.grad, torch.autograd.grad(total(*inputs), inputs)[1])


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["f64", "f32"])
def test_coincident_points_are_finite(dtype):
    """Features all equal under different labels, or each at its center (two centers equal): values
    and gradients finite, intra 0 with no gradient to the centers (inter does not touch them)."""
    row = torch.tensor([0.3, -1.7, 2.2], dtype=dtype)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    sa = StandaloneCenterLoss(3, 3).to(dtype)
    features = row.repeat(6, 1).requires_grad_(True)
    inter, total = inter_loss(features, y), sa(features, y)
    assert abs(inter.item()) < 1e-4
    (inter + total).backward()
    assert all(torch.isfinite(t).all() for t in (inter, total, features.grad, sa.centers.grad))
    centers = torch.tensor([[1.0, 2], [1, 2], [-3, 0.5]], dtype=dtype, requires_grad=True)
    features = centers.detach()[y].clone().requires_grad_(True)
    intra, inter = intra_loss(features, centers, y), inter_loss(features, y)
    assert intra.item() == 0.0
    assert inter.item() == pytest.approx(ref_inter(features.detach(), y), rel=1e-4, abs=1e-5)
    (intra + inter).backward()
    assert torch.isfinite(features.grad).all() and (centers.grad == 0).all()


def test_squared_distances_clamp_at_zero_and_inter_stays_finite():
    """a^2 + b^2 - 2ab can round below zero for equal rows; the clamp makes it exactly 0, and inter
    and its gradient stay finite for such rows under different labels."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 16, generator=g) * 1000 + torch.randn(256, 1, generator=g) * 3000
    a2 = a.pow(2).sum(1, keepdim=True)
    raw = a2 + a2.t() - 2.0 * a @ a.t()
    d = squared_distances(a, a)
    negative = raw < 0
    assert negative.any(), "this input is meant to round the expansion below zero"
    assert (d[negative] == 0).all() and torch.equal(d[~negative], raw[~negative])
    features = torch.cat([a[:64], a[:64]]).requires_grad_(True)
    loss = inter_loss(features, torch.arange(128) // 64)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()


def test_inter_margin_truncates_far_pairs():
    # A and B are close (d = 0.25) with different labels; C is far (d >= 90) from both.
    features = torch.tensor([[0.0, 0], [0.5, 0], [10, 0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    margin = 4.0
    loss = inter_loss(features, y, margin=margin)
    expected = -(2 * math.log1p(0.25) + 4 * math.log1p(margin)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert loss.item() == pytest.approx(ref_inter(features.detach(), y, margin), rel=1e-12)
    loss.backward()
    assert (features.grad[2] == 0).all(), "a pair beyond the margin must get no gradient"
    assert (features.grad[:2].abs().sum(1) > 0).all()
    # Moving A and B apart lowers the loss (their push), symmetric gradients.
    torch.testing.assert_close(features.grad[0], -features.grad[1])
    assert features.grad[0, 0] > 0  # A is pushed to smaller x (gradient descent goes against it)
    # All pairs beyond the margin: -(2 pairs * log(1 + margin)) / 2, and no gradient at all.
    far = torch.tensor([[0.0, 0.0], [0.0, 5.0]], requires_grad=True)
    loss = inter_loss(far, torch.tensor([0, 1]), margin=1.0)
    assert loss.item() == pytest.approx(-math.log1p(1.0), rel=1e-6)
    loss.backward()
    assert (far.grad == 0).all()


def test_standalone_module_defaults_and_margin():
    sa = StandaloneCenterLoss(10, 2)
    assert (sa.weight_intra, sa.weight_inter, sa.inter_margin) == (1.0, 0.1, None)
    assert [(n, p.shape) for n, p in sa.named_parameters()] == [("centers", (10, 2))]
    assert all(isinstance(m.centers, nn.Parameter) for m in (sa, CenterLoss(7, 3)))
    features, _, y = sample(torch.float64, LABEL_PATTERNS["balanced"], 3, seed=12, scale=3.0)
    _, inter = StandaloneCenterLoss(NUM_CLASSES, 3, inter_margin=2.0).double().terms(features, y)
    assert inter.item() == pytest.approx(ref_inter(features, y, 2.0), rel=1e-10)
    assert inter.item() != pytest.approx(ref_inter(features, y), rel=1e-3)


@pytest.mark.parametrize(
    "loss, weights, coefs",
    [
        ("xent", {}, {"xent": 1}),
        ("cent", {"weight_cent": 0.5}, {"xent": 1, "intra": 0.5}),
        ("standalone", {"weight_intra": 1.5, "weight_inter": 0.2}, {"intra": 1.5, "inter": 0.2}),
        ("standalone", {"inter_margin": 0.5}, {"intra": 1, "inter": 0.1}),
    ],
)
def test_objective_is_its_weighted_terms(loss, weights, coefs):
    """Terms and total against the references; the standalone loss never reads the logits (NaN
    here); the centers, where the loss has them, are the objective's one parameter and train."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(8, 3, generator=g) * 10  # pairs beyond the margin
    logits, y = torch.randn(8, 4, generator=g), torch.arange(8) % 4
    torch.manual_seed(0)
    objective = Objective(loss, 4, 3, **weights)
    centers = objective.centers
    refs = {
        "xent": F.cross_entropy(logits, y).item(),
        "intra": None if centers is None else ref_intra(features, centers.detach(), y),
        "inter": ref_inter(features, y, weights.get("inter_margin")),
    }
    if loss == "standalone":
        logits = torch.full_like(logits, float("nan"))
    total, terms = objective(features, logits, y)
    got = {k: v.item() for k, v in terms.items()}
    assert got == pytest.approx({k: refs[k] for k in coefs}, rel=1e-5)
    assert total.item() == pytest.approx(sum(c * refs[k] for k, c in coefs.items()), rel=1e-5)

    assert [id(p) for p in objective.parameters()] == ([] if centers is None else [id(centers)])
    if centers is not None:
        assert isinstance(centers, nn.Parameter) and centers.shape == (4, 3)
        total.backward()
        assert centers.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", LOSSES)
def test_objective_computes_in_float32_under_autocast(loss):
    """Each of LOSSES has the terms it declares, centers where it has them. Under a caller's bf16
    autocast the objective's values are its float32 values, for float32 and bf16 inputs; features
    far from the origin make 16-bit distances visibly wrong."""
    g = torch.Generator().manual_seed(4)
    features = torch.randn(16, 3, generator=g) * 3 + 20
    logits, y = torch.randn(16, 4, generator=g) * 3, torch.arange(16) % 4
    torch.manual_seed(0)
    objective = Objective(loss, 4, 3)
    assert sorted(objective(features, logits, y)[1]) == sorted(objective.terms_used)
    assert (objective.centers is None) == (loss == "xent")
    for inputs in ((features, logits), (features.bfloat16(), logits.bfloat16())):
        reference, reference_terms = objective(inputs[0].float(), inputs[1].float(), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, terms = objective(*inputs, y)
        assert {t.dtype for t in (total, *terms.values())} == {torch.float32}
        got = {k: v.item() for k, v in {"total": total, **terms}.items()}
        want = {k: v.item() for k, v in {"total": reference, **reference_terms}.items()}
        assert got == pytest.approx(want, rel=1e-6)
    if loss == "standalone":  # the same distances in bf16 are far off: a 16-bit matmul would show
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sloppy = squared_distances(features, features)
        assert not torch.allclose(sloppy.float(), squared_distances(features, features), rtol=1e-3)


def test_objective_refuses_an_unknown_loss_naming_the_choices():
    choices = "xent, cent, standalone, centers-apart, center-softmax"
    with pytest.raises(ValueError, match=f"^unknown loss 'softmax'; choose one of {choices}$"):
        Objective("softmax", 4, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "module_cls", [CenterLoss, StandaloneCenterLoss, CentersApartLoss, CenterSoftmaxLoss]
)
def test_loss_modules_compute_in_float32_under_autocast(module_cls, dtype):
    """Under fp16/bf16 autocast at feature norm ~340 (fp16's ||x||^2 overflows, bf16 loses the
    distances) value and gradients equal float32's to 1e-5; 16-bit features give their float32
    copy's value, and its gradient rounded to their dtype."""
    g = torch.Generator().manual_seed(6)
    labels = torch.arange(16) % 4
    means = F.normalize(torch.randn(4, 8, generator=g), dim=1) * 340
    features = means[labels] + 3 * torch.randn(16, 8, generator=g)
    assert 300 < features.norm(dim=1).min() and features.norm(dim=1).max() < 380
    torch.manual_seed(0)
    module = module_cls(4, 8)
    with torch.no_grad():  # centers near the features: centers-apart's exp stays finite
        module.centers.copy_(means + torch.randn(4, 8, generator=g))

    def value_and_grads(x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, ...]:
        x = x.detach().requires_grad_()
        module.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = module(x, labels)
        loss.backward()
        return loss.detach(), x.grad, module.centers.grad.clone()

    reference = value_and_grads(features, autocast=False)
    assert all(torch.isfinite(t).all() for t in reference)
    for got, want in zip(value_and_grads(features, autocast=True), reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    low = features.to(dtype)
    value, grad, centers_grad = value_and_grads(low.float(), autocast=False)
    wanted = (value, grad.to(dtype), centers_grad)  # the gradient rounded to the features' dtype
    for got, want in zip(value_and_grads(low, autocast=True), wanted):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def ref_paper_update(centers, features, labels, alpha: float) -> list[list[float]]:
    """Wen et al., eq. 4, one center and one sample at a time."""
    c, x, y = centers.double().tolist(), features.double().tolist(), labels.tolist()
    new = []
    for j, center in enumerate(c):
        members = [x[i] for i in range(len(x)) if y[i] == j]
        delta = [sum(c - m[d] for m in members) / (1 + len(members)) for d, c in enumerate(center)]
        new.append([c - alpha * dc for c, dc in zip(center, delta)])
    return new


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["f64", "f32"])
@pytest.mark.parametrize("pattern", ["unbalanced", "all_same", "two_classes"])
def test_paper_center_update_matches_a_loop(dtype, pattern):
    features, centers, y = sample(dtype, LABEL_PATTERNS[pattern])
    before = centers.clone()
    paper_center_update(centers, features, y, 0.3)
    want = ref_paper_update(before, features, y, 0.3)
    assert centers.tolist() == [pytest.approx(row, **DTYPES[dtype]) for row in want]

    absent = [k for k in range(NUM_CLASSES) if k not in LABEL_PATTERNS[pattern]]
    assert absent and torch.equal(centers[absent], before[absent])  # absent classes stay put
    assert not torch.equal(centers, before)


def test_paper_center_update_with_alpha_1_moves_a_lone_sample_halfway():
    """One sample x of class j: delta = (c - x) / 2, so alpha 1 puts the center at the midpoint."""
    centers = torch.zeros(3, 2)
    paper_center_update(centers, torch.tensor([[4.0, -2.0]]), torch.tensor([1]), 1.0)
    assert centers.tolist() == [[0.0, 0.0], [2.0, -1.0], [0.0, 0.0]]
