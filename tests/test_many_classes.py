"""Center loss at face-recognition scale: center updates that touch only the batch's rows, chunked
nearest-center evaluation, and a whole main.py run on 10,000 classes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.axes
import numpy as np
import pytest
import torch

import evaluation
import main
import metrics
import visualize
from config import parse_args
from datasets import Dataset, ImageData
from losses import CenterLoss, RowSGD, intra_loss, paper_center_update
from training import build_trainer, train_step
from utils import CHUNK_BYTES


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, centers, labels) of 6 classes in 3-D; labels repeat, classes 3 and 5 are absent."""
    g = torch.Generator().manual_seed(0)
    features, centers = torch.randn(7, 3, generator=g), torch.randn(6, 3, generator=g)
    return features, centers, torch.tensor([4, 1, 4, 0, 4, 1, 2])


def center_loss(centers: torch.Tensor) -> CenterLoss:
    """CenterLoss(sparse=True) on these centers: its gradient lands in .rows.grad, the batch's rows."""
    criterion = CenterLoss(*centers.shape, sparse=True)
    criterion.centers.data.copy_(centers)
    return criterion


def row_step(opt: RowSGD, criterion: CenterLoss, x, y, apply=None) -> torch.Tensor:
    """One step as training.py takes it: the loss, backward, RowSGD on the batch's rows."""
    criterion(x, y).backward()
    assert criterion.centers.grad is None and criterion.rows.grad.shape == x.shape
    return opt.step(criterion.labels, criterion.rows.grad, apply)


def test_row_sgd_is_torch_sgd_on_present_classes_and_lazy_on_absent_ones() -> None:
    """Two steps (classes {0, 1, 2, 4}, then {1}) of torch's SGD (momentum 0.9) on the dense gradient
    and of RowSGD, restored from its state_dict between them (another lr and momentum given): class
    1 agrees; 0, 2, 4 keep their step-one values where SGD lets them coast; classes never seen stay
    put."""
    features, centers, labels = batch()
    second = (features[:2], torch.tensor([1, 1]))
    dense, criterion = centers.clone().requires_grad_(), center_loss(centers)
    lazy = criterion.centers
    sgd, rows = torch.optim.SGD([dense], lr=0.1, momentum=0.9), RowSGD(lazy, lr=0.1, momentum=0.9)
    assert isinstance(rows, torch.optim.Optimizer)
    after_first = None
    for x, y in ((features, labels), second):
        sgd.zero_grad()
        intra_loss(x, dense, y).backward()
        sgd.step()
        assert row_step(rows, criterion, x, y)
        if after_first is None:  # the restored lr and momentum buffer step on as the original
            after_first = dense.detach().clone()
            saved, rows = rows.state_dict(), RowSGD(lazy, lr=0.5, momentum=0.0)
            rows.load_state_dict(saved)
    buffer = rows.state[lazy]["momentum_buffer"]
    torch.testing.assert_close(lazy.data[1], dense.data[1])
    torch.testing.assert_close(lazy.data[[0, 2, 4]], after_first[[0, 2, 4]])
    assert not torch.allclose(dense.data[4], after_first[4])  # SGD's momentum moved absent class 4
    torch.testing.assert_close(buffer[1], sgd.state[dense]["momentum_buffer"][1])
    assert torch.equal(lazy.data[[3, 5]], centers[[3, 5]]) and not buffer[[3, 5]].any()
    assert buffer.layout == torch.strided and buffer.shape == centers.shape  # nothing grows


def test_row_sgd_sums_repeated_rows_in_any_order() -> None:
    """A class's gradient is the sum over its repeats wherever they sit: as one dense SGD step."""
    g = torch.Generator().manual_seed(1)
    rows, grads = torch.randint(0, 20, (64,), generator=g), torch.randn(64, 5, generator=g)
    dense = torch.zeros(20, 5).index_add_(0, rows, grads)
    for order in (torch.arange(64), torch.randperm(64, generator=g), torch.arange(63, -1, -1)):
        c = torch.zeros(20, 5)
        assert RowSGD(c, lr=1.0, momentum=0.9).step(rows[order], grads[order])
        torch.testing.assert_close(c, -dense)


@pytest.mark.parametrize("update", ["paper", "sgd"])
def test_center_updates_do_nothing_unless_applied_and_finite(update: str) -> None:
    """apply False, or rows not finite: centers and momentum stay; the update says if rows were finite."""
    features, centers, labels = batch()
    for apply, x in ((False, features), (True, features * float("inf")), (True, features)):
        apply = torch.tensor(apply)
        if update == "paper":
            c = centers.clone()
            ok = paper_center_update(c, x, labels, 0.5, apply)
        else:
            criterion = center_loss(centers)
            c, opt = criterion.centers, RowSGD(criterion.centers, lr=0.1, momentum=0.9)
            ok = row_step(opt, criterion, x, labels, apply)
            buffer = opt.state[c]["momentum_buffer"]
            assert torch.equal(buffer, torch.zeros_like(centers)) == (not bool(ok & apply))
        assert bool(ok) == bool(torch.isfinite(x).all())
        assert torch.equal(c, centers) == (not bool(ok & apply))


def test_row_sgd_step_runs_on_shapes_alone() -> None:
    """No host sync in a step (no .item(), no data-sized op such as coalesce, unique, nonzero): on the
    meta device, where exactly those fail, the intra term, its backward and RowSGD's step run."""
    criterion = CenterLoss(100_000, 8, sparse=True).to("meta")
    opt = RowSGD(criterion.centers, lr=0.1, momentum=0.9)
    labels = torch.randint(0, 100_000, (128,)).to("meta")
    criterion.intra(torch.randn(128, 8, device="meta"), labels).backward()
    ok = opt.step(criterion.labels, criterion.rows.grad, torch.tensor(True, device="meta"))
    assert ok.device.type == "meta"
    assert opt.state[criterion.centers]["momentum_buffer"].shape == (100_000, 8)
    grad, size = criterion.rows.grad, (100_000, 8)
    sparse_gradient = torch.sparse_coo_tensor(labels[None], grad, size, check_invariants=False)
    for data_sized in (sparse_gradient.coalesce, labels.unique, labels.nonzero, labels.sum().item):
        with pytest.raises((NotImplementedError, RuntimeError)):
            data_sized()


def test_nearest_over_100000_centers_keeps_each_chunk_of_distances_within_64_mib(monkeypatch):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(100_000, 8, generator=g)
    picked = torch.randint(0, 100_000, (600,), generator=g)
    features = centers[picked] + 0.001 * torch.randn(600, 8, generator=g)
    sizes, cdist = [], torch.cdist
    record = lambda a, b: sizes.append(len(a) * len(b) * 4) or cdist(a, b)  # noqa: E731
    monkeypatch.setattr(torch, "cdist", record)
    assert torch.equal(evaluation.nearest(features, centers), picked)
    assert len(sizes) > 1 and max(sizes) <= CHUNK_BYTES
    exclude = torch.zeros(100_000, dtype=torch.bool)
    exclude[picked[:5]] = True  # an excluded (never seen) class is not predicted
    assert not (evaluation.nearest(features[:5], centers, exclude) == picked[:5]).any()


def test_main_step_at_100000_classes_moves_only_the_batch_centers() -> None:
    """main.py's step at 100,000 classes moves the centers and momentum rows of its batch's classes
    only; the next batch's step (other classes) leaves them (lazy momentum)."""
    t = trainer(100_000, ["--feat-dim", "2", "--seed", "3"])
    centers = t.objective.centers
    initial = centers.detach().clone()
    first, second = torch.tensor([7, 99_999, 7, 5_000] * 4), torch.tensor([1, 2, 3, 4] * 4)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    *_, finite = train_step(t, x, first)
    after_first = centers.detach().clone()
    *_, finite_second = train_step(t, x, second)
    assert finite and finite_second
    moved = (after_first != initial).any(1).nonzero().flatten().tolist()
    assert moved == [7, 5_000, 99_999]
    assert torch.equal(centers[[7, 5_000, 99_999]], after_first[[7, 5_000, 99_999]])
    assert (centers != after_first).any(1).nonzero().flatten().tolist() == [1, 2, 3, 4]
    buffer = t.center_optimizer.state[centers]["momentum_buffer"]
    assert buffer.any(1).nonzero().flatten().tolist() == [1, 2, 3, 4, 7, 5_000, 99_999]
    assert centers.grad is None  # never a C x D gradient


def test_metrics_at_many_classes_keep_each_chunk_within_64_mib(monkeypatch) -> None:
    """center_distance_ratio over 6,000 class means (144 MB at once) against float64, and k-NN votes
    over 100,000 classes, each chunk within utils.CHUNK_BYTES."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6_000).repeat(2)
    means = torch.randn(6_000, 4, generator=g)
    features = means[labels] + torch.randn(12_000, 4, generator=g)
    sizes, distances = [], metrics.squared_distances
    record = lambda a, b: sizes.append(len(a) * len(b) * 4) or distances(a, b)  # noqa: E731
    monkeypatch.setattr(metrics, "squared_distances", record)
    ratio = metrics.center_distance_ratio(features, labels)
    assert len(sizes) > 1 and max(sizes) <= CHUNK_BYTES
    x = features.double()
    class_means = (x[:6_000] + x[6_000:]) / 2
    intra = (x - class_means[labels]).norm(dim=1).mean()
    pair = sum(float(torch.cdist(m, class_means).sum()) for m in class_means.split(1000))
    pair /= 6_000 * 5_999
    assert ratio == pytest.approx(float(intra) / pair, rel=1e-5)
    votes, zeros = [], torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: votes.append(a) or zeros(*a, **k))
    query_labels = torch.randint(0, 100_000, (300,), generator=g)
    assert metrics.knn_accuracy(features[:300], query_labels, features[:300], query_labels, 1) == 1
    assert len(votes) > 1 and all(rows * classes * 8 <= CHUNK_BYTES for rows, classes in votes)


def test_frames_of_many_classes_have_no_legend(tmp_path: Path, monkeypatch) -> None:
    """No legend past visualize.LEGEND_CLASSES (10,000 names: minutes to lay out); 10 keep theirs."""
    legends = []
    legend = lambda self, *a, **k: legends.append(len(k["handles"]))  # noqa: E731
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend)
    points, rng = np.random.default_rng(0).normal(size=(200, 2)), np.random.default_rng(1)
    for num_classes in (10, 10_000):
        labels = rng.integers(0, num_classes, 200)
        centers = np.random.default_rng(2).normal(size=(num_classes, 2))
        names, limits = [str(k) for k in range(num_classes)], np.array([[-3, 3], [-3, 3]])
        path = tmp_path / f"{num_classes}.png"
        visualize.draw_frame(path, points, labels, centers, names, "t", limits)
        assert path.stat().st_size > 0
    assert legends == [10]


def many_class_data(num_classes=10_000, per_class=2, test_size=1000) -> Dataset:
    """8x8 grey images, `per_class` a class, shuffled (--train-samples then takes a mix of classes)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat(per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.randint(0, 256, (len(labels), 1, 8, 8), generator=g, dtype=torch.uint8)
    test_labels = torch.randint(0, num_classes, (test_size,), generator=g)
    test_images = torch.randint(0, 256, (test_size, 1, 8, 8), generator=g, dtype=torch.uint8)
    train, test = ImageData(images, labels), ImageData(test_images, test_labels)
    return Dataset("faces", train, test, [f"id{k}" for k in range(num_classes)], (), "synthetic")


def trainer(num_classes: int, argv: list[str]):
    data = SimpleNamespace(channels=1, classes=range(num_classes), image_size=8)
    data.train = SimpleNamespace(images=None)

    return build_trainer(parse_args(argv), data, torch.device("cpu"))


def test_main_trains_and_evaluates_10000_classes(tmp_path: Path, monkeypatch) -> None:
    """A whole --loss cent run (2 epochs of 4 steps, 2-D) on 10,000 classes: accuracies, metrics,
    frames, GIFs; a set's logits (20,000 x 100,000 float32 is 8 GB) are never put together, only
    EVAL_BATCH rows at a time, and acc is the logits' argmax, center_acc the nearest center's."""
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: many_class_data())
    sizes, cat = [], torch.cat
    record = lambda tensors, *a, **k: sizes.append((out := cat(tensors, *a, **k)).numel()) or out  # noqa: E731
    monkeypatch.setattr(torch, "cat", record)
    flags = "--loss cent --feat-dim 2 --epochs 2 --batch-size 64 --train-samples 256".split()
    assert main.main([*flags, "--out", str(tmp_path), "--name", "faces", "--device", "cpu"]) == 0
    assert max(sizes) < 1000 * 10_000 // 4
    run_dir = tmp_path / "faces"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_classes"] == 10_000 and summary["epochs"] == 2
    with np.load(run_dir / "frames" / "test" / "epoch_002.npz") as test:
        f, centers, labels = (torch.from_numpy(test[k]) for k in ("features", "centers", "labels"))
    nearest = (f[:, None] - centers[None]).square().sum(2).argmin(1)  # the run's rule, recomputed
    assert summary["center_acc"] == (nearest == labels).float().mean().item()
    model = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    logits = f @ model["classifier.weight"].T + model["classifier.bias"]
    assert summary["acc"] == (logits.argmax(1) == labels).float().mean().item()
    ratio = metrics.center_distance_ratio(f, labels)
    assert summary["center_distance_ratio"] == pytest.approx(ratio, rel=1e-5)
    hits = summary["knn1_acc"] * len(labels)  # a share of the test images
    assert hits == pytest.approx(round(hits), abs=1e-6)
    frames = sorted(p.name for p in (run_dir / "frames").glob("*/epoch_*.png"))
    assert frames == ["epoch_001.png", "epoch_001.png", "epoch_002.png", "epoch_002.png"]
    assert sorted(p.name for p in run_dir.glob("*.gif")) == ["test.gif", "train.gif"]


@pytest.mark.parametrize("init_scale", [1.0, 1024.0, 3e38])
def test_fp16_sgd_centers_take_the_unscaled_gradient_and_stay_when_the_scaler_skips(init_scale):
    """Under --amp fp16 the step divides the centers' row gradient (scaled, unseen by the GradScaler)
    back: the centers move the same at any scale; a skipped step leaves them and is not a bad one."""
    t = trainer(10, ["--amp", "fp16", "--feat-dim", "2", "--seed", "3"])
    t.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    centers = t.objective.centers
    before = centers.detach().clone()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 10
    features, *_, finite = train_step(t, x, y)
    assert bool(finite) == (init_scale < 1e30)
    if init_scale > 1e30:
        assert torch.equal(centers, before)
        return
    lr = t.optimizer.param_groups[1]["lr"]
    grad = torch.stack([(before[k] - features.detach()[y == k]).sum(0) * 2 / 16 for k in range(10)])
    # The first step: momentum buffer = gradient of intra (weight 1), mean over 16.
    torch.testing.assert_close(centers.detach(), before - lr * grad, rtol=1e-4, atol=1e-6)


def test_a_many_class_run_cut_after_an_epoch_resumes_bit_for_bit(tmp_path, monkeypatch) -> None:
    """200 classes at batch 16: a run cut after epoch 1 and resumed ends as the straight run, bit for
    bit, the centers' momentum buffer (in the checkpoint) included."""
    monkeypatch.setattr(main, "load_dataset", lambda *a, **k: many_class_data(200, 4, 64))
    args = "--loss standalone --feat-dim 2 --batch-size 16 --train-samples 96 --no-plots".split()
    args += ["--model", "lenet++", "--device", "cpu", "--out", str(tmp_path)]
    assert main.main([*args, "--epochs", "2", "--name", "straight"]) == 0
    assert main.main([*args, "--epochs", "1", "--name", "cut"]) == 0
    (tmp_path / "cut" / "summary.json").unlink()
    assert main.main([*args, "--epochs", "2", "--name", "cut"]) == 0
    straight, resumed = (
        torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("straight", "cut")
    )
    buffers = [c["center_optimizer"]["state"][0]["momentum_buffer"] for c in (straight, resumed)]
    assert torch.equal(*buffers) and 0 < int(buffers[0].any(1).sum()) < 200  # lazy: classes seen
    for part in ("model", "objective"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part]), part
