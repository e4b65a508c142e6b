"""Retrieval (P@1, R-precision, MAP@R: pytorch-metric-learning's AccuracyCalculator; Musgrave et al., ECCV 2020), k-NN,
clustering (NMI, AMI: scikit-learn) and class geometry of features: exact search, squared Euclidean, in chunks of queries."""

import functools
import warnings

import torch
from torch import Tensor

from losses import squared_distances
from utils import chunk_rows

CHUNK = 512  # queries per chunk: 512 x 60,000 float32 distances = 123 MB
CLUSTER_CLASSES = 1000  # NMI/AMI up to this many classes: k-means costs n k D a pass (5,000 of 10,000 128-D points: 87 s)
RETRIEVAL_METRICS = ("precision_at_1", "r_precision", "map_at_r")
# the same in AccuracyCalculator
PML_NAMES = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
FEATURE_METRICS = ("knn1_acc", "knn10_acc", *RETRIEVAL_METRICS, "nmi", "ami")
FEATURE_METRICS += ("center_distance_ratio",)
# among the classes never trained on (--train-classes)
OPEN_SET_METRICS = tuple(f"open_{name}" for name in RETRIEVAL_METRICS)
GEOMETRY_METRICS = tuple(
    "intra_distance min_center_gap mean_center_gap min_gap_ratio mean_gap_ratio feature_norm".split()
)


def stable_knn(
    query: Tensor, k: int, reference: Tensor, ref_includes_query: bool, positions: Tensor
) -> tuple:
    """pml's knn_func: the k nearest reference rows, ties to the lower position (positions[j]: row j's place in the caller's
    order, a permutation). pml's CustomKNN (torch.topk) leaves ties unordered; its FaissKNN needs faiss."""
    # skip: pml passes the queries as the reference's first rows
    skip, rows, found = (int(ref_includes_query), positions.argsort(), [])
    for start in range(0, len(query), CHUNK):
        # + 0.0: no -0.0
        d = squared_distances(query[start : start + CHUNK].float(), reference.float()) + 0.0
        if skip:  # the query itself first (distances are >= 0), then left out
            d[torch.arange(len(d)), torch.arange(len(d)) + start] = -1.0
        # (distance, position) as one int64: float32 bits >= 0 order as the floats, so its top-k is a stable sort's first k
        keys = d.view(torch.int32).long() << 32 | positions
        nearest = rows[keys.topk(k + skip, dim=1, largest=False).values[:, skip:] & 0xFFFFFFFF]
        found.append((d.gather(1, nearest), nearest))
    return tuple(torch.cat(parts) for parts in zip(*found))


def knn_accuracy(
    query: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor, k: int
) -> float:
    """Accuracy of the k (<= gallery size) nearest gallery points' majority label; tied votes: smaller rank sum, then label. Not in pml."""
    k, classes = min(k, len(gallery)), int(max(query_labels.max(), gallery_labels.max())) + 1
    # rank r adds k(k+1) + k - r: bonuses < one vote
    weights = k * (k + 1) + k - torch.arange(k, device=gallery.device)
    correct, chunk = 0, min(CHUNK, chunk_rows(classes, itemsize=8))  # votes: chunk x classes int64
    for start in range(0, len(query), chunk):
        d = squared_distances(query[start : start + chunk].float(), gallery.float())
        idx = d.topk(k, dim=1, largest=False).indices
        votes = torch.zeros(len(idx), classes, device=idx.device, dtype=torch.int64)
        votes.scatter_add_(1, gallery_labels[idx], weights.expand_as(idx))
        correct += int((votes.argmax(1) == query_labels[start : start + chunk]).sum())
    return correct / len(query)


def retrieval_scores(features: Tensor, labels: Tensor) -> dict[str, float | None]:
    """P@1 = rel(1), R-precision = (1/R) sum_{i<=R} rel(i), MAP@R = (1/R) sum_{i<=R} P(i) rel(i), the set its own gallery less the
    query (R: classmates, rel(i): neighbour i a classmate, P(i): precision of the first i); mean over queries with R > 0, else None."""
    if int((counts := torch.bincount(labels)).max()) < 2:
        return dict.fromkeys(RETRIEVAL_METRICS)
    # NaN: pml would refuse them (its check that the queries lead the reference)
    if not bool(torch.isfinite(features).all()):
        return dict.fromkeys(RETRIEVAL_METRICS, float("nan"))
    # with scikit-learn: seconds, so only when used
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(
        include=PML_NAMES, k="max_bin_count", device=features.device, knn_func=stable_knn
    )
    # pml compares each distinct query label with every reference label at once (20,000 classes, 40,000 images: 8 GB): chunks
    scored, sums = counts[labels] > 1, dict.fromkeys(PML_NAMES, 0.0)
    everyone = torch.arange(len(labels), device=labels.device)
    for start in range(0, len(labels), CHUNK):
        chunk = everyone[start : start + CHUNK]  # the first rows of its reference
        # pml averages over the chunk's queries that have a classmate
        if n := int(scored[chunk].sum()):
            order = torch.cat([chunk, everyone[:start], everyone[start + CHUNK :]])
            # ties to the lower index, as unchunked
            calculator.knn_func = functools.partial(stable_knn, positions=order)
            scores = calculator.get_accuracy(
                features[chunk].float(), labels[chunk], features[order].float(), labels[order], True
            )
            sums = {name: total + n * float(scores[name]) for name, total in sums.items()}
    return {name: sums[pml] / int(scored.sum()) for name, pml in zip(RETRIEVAL_METRICS, PML_NAMES)}


def clustering_scores(
    features: Tensor, labels: Tensor, seed: int = 0
) -> tuple[float | None, float | None]:
    """NMI, AMI of KMeans (3 seeded restarts, k: classes present); None if k is 1, the sample count (all score 1) or > CLUSTER_CLASSES."""
    points, k, truth = features.float().cpu().numpy(), len(labels.unique()), labels.cpu().numpy()
    if not 1 < k < len(points) or k > CLUSTER_CLASSES:
        return None, None
    from sklearn.cluster import KMeans  # imported when used, as AccuracyCalculator
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    with warnings.catch_warnings():
        # collapsed features: fewer distinct points than k
        warnings.simplefilter("ignore", ConvergenceWarning)
        clusters = KMeans(k, n_init=3, random_state=seed).fit_predict(points)
    scores = (normalized_mutual_info_score, adjusted_mutual_info_score)
    return tuple(float(score(truth, clusters)) for score in scores)


def class_geometry(features: Tensor, labels: Tensor) -> dict[str, float | None]:
    """mu_k: class k's mean. intra_distance = mean_i ||x_i - mu_{y_i}||, min/mean_center_gap = min/mean_{k != l} ||mu_k - mu_l||,
    min/mean_gap_ratio = gap / intra_distance, feature_norm = mean_i ||x_i||; NaN if not finite, gaps None for one class."""
    if not bool(torch.isfinite(features := features.float()).all()):
        return dict.fromkeys(GEOMETRY_METRICS, float("nan"))
    present, index = labels.unique(return_inverse=True)
    sums = features.new_zeros(len(present), features.shape[1]).index_add_(0, index, features)
    means = sums / torch.bincount(index)[:, None]
    intra, k = float((features - means[index]).norm(dim=1).mean()), len(present)
    # C x C gaps in chunks of rows: 100,000 classes would take 40 GB
    low, total, step = float("inf"), 0.0, chunk_rows(k)
    for start in range(0, k if k > 1 else 0, step):
        gaps = squared_distances(means[start : start + step], means).sqrt()
        # a class and itself are no pair
        gaps[torch.arange(len(gaps)), torch.arange(len(gaps)) + start] = float("inf")
        low = min(low, float(gaps.min()))
        total += float(gaps.masked_fill(gaps.isinf(), 0).sum(dtype=torch.float64))
    gaps = (low, total / (k * (k - 1))) if k > 1 else (None, None)
    ratios = tuple(gap / intra if gap is not None and intra > 0 else None for gap in gaps)
    return dict(zip(GEOMETRY_METRICS, (intra, *gaps, *ratios, float(features.norm(dim=1).mean()))))


def center_distance_ratio(features: Tensor, labels: Tensor) -> float | None:
    """intra_distance / mean_center_gap (1 / mean_gap_ratio): below 1 when classes are tighter than apart; None for one class."""
    gap = (geometry := class_geometry(features, labels))["mean_center_gap"]
    return geometry["intra_distance"] / gap if gap else None


def feature_metrics(
    test: Tensor, test_labels: Tensor, train: Tensor, train_labels: Tensor, seed: int = 0
) -> dict:
    """FEATURE_METRICS of the test features (train: the k-NN gallery); NaN for non-finite features, None where the set gives none."""
    if not (torch.isfinite(test).all() and torch.isfinite(train).all()):
        return dict.fromkeys(FEATURE_METRICS, float("nan"))
    knn = functools.partial(knn_accuracy, test, test_labels, train, train_labels)
    scores = {f"knn{k}_acc": knn(k) for k in (1, 10)}
    scores |= retrieval_scores(test, test_labels)
    scores |= dict(zip(("nmi", "ami"), clustering_scores(test, test_labels, seed)))
    return scores | {"center_distance_ratio": center_distance_ratio(test, test_labels)}
