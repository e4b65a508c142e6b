"""Retrieval and clustering quality of learned features, by exact (brute-force) search in torch.

Definitions follow the metric-learning literature, mainly Musgrave, Belongie and Lim, "A Metric
Learning Reality Check", ECCV 2020 (precision@1, MAP@R), and Vinh, Epps and Bailey, JMLR 2010
(NMI, AMI). Distances are squared Euclidean; queries are processed in chunks so that a 10,000 x
60,000 search fits in a few hundred MB.
"""

from __future__ import annotations

import torch

from losses import squared_distances
from utils import chunk_rows

CHUNK = 512  # queries per chunk: 512 x 60,000 float32 distances = 123 MB
RETRIEVAL_METRICS = ("precision_at_1", "r_precision", "map_at_r")
FEATURE_METRICS = ("knn1_acc", "knn10_acc", *RETRIEVAL_METRICS, "nmi", "ami", "center_distance_ratio")
# Retrieval among the test images of classes the run never trained on (--train-classes).
OPEN_SET_METRICS = tuple(f"open_{name}" for name in RETRIEVAL_METRICS)
GEOMETRY_METRICS = ("intra_distance", "min_center_gap", "mean_center_gap", "min_gap_ratio", "mean_gap_ratio", "feature_norm")


def knn_accuracy(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor, gallery_labels: torch.Tensor, k: int) -> float:
    """k-nearest-neighbour accuracy: each query takes the majority label of its k nearest gallery
    points, k at most the gallery's size. A tie in votes goes to the tied label whose neighbours
    have the smaller sum of ranks (nearer on the whole), a tie in that to the smaller label index.
    For k = 5 with ranks 0 and 4 of label 0 and ranks 1 and 2 of label 1, label 1 wins."""
    k = min(k, len(gallery))
    num_classes = int(max(query_labels.max(), gallery_labels.max())) + 1
    # In integers, exactly: a neighbour at rank r (0-based) adds k(k+1) + (k - r). One label's
    # rank bonuses sum to at most k(k+1)/2, less than one vote, so they only break ties; argmax
    # takes the first (smallest) label among equal scores.
    weights = k * (k + 1) + k - torch.arange(k, device=gallery.device)
    correct = 0
    chunk = min(CHUNK, chunk_rows(num_classes, itemsize=8))  # the votes: chunk x classes int64 (100,000 classes: 83 queries)
    for start in range(0, len(query), chunk):
        d = squared_distances(query[start : start + chunk].float(), gallery.float())
        idx = d.topk(k, dim=1, largest=False).indices  # sorted, nearest first
        votes = torch.zeros(len(idx), num_classes, device=idx.device, dtype=torch.int64)
        votes.scatter_add_(1, gallery_labels[idx], weights.expand_as(idx).contiguous())
        correct += int((votes.argmax(1) == query_labels[start : start + chunk]).sum())
    return correct / len(query)


def retrieval_scores(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """Precision@1, R-precision and MAP@R of the set as its own gallery, each query left out of its
    results (pytorch-metric-learning's AccuracyCalculator with the query in the reference set).

    For a query with R other samples of its class and rel(i) whether its i-th nearest neighbour
    shares the label: P@1 = rel(1); R-precision = (1/R) sum_{i<=R} rel(i); MAP@R = (1/R) sum_{i<=R}
    P(i) rel(i), P(i) the precision of the first i neighbours (Musgrave et al., 2020). Each is
    averaged over the queries that have a classmate; neighbours at equal distance are ranked by their
    index (a stable sort), so ties have one answer. All None when no query has a classmate (one sample
    per class).
    """
    features = features.float()
    counts = torch.bincount(labels)
    relevant = counts[labels] - 1
    max_r = int(relevant.max())
    if max_r == 0:
        return dict.fromkeys(RETRIEVAL_METRICS)
    sums, used = torch.zeros(3, dtype=torch.float64), 0
    ranks = torch.arange(1, max_r + 1, device=features.device, dtype=torch.float32)
    for start in range(0, len(features), CHUNK):
        rows = torch.arange(start, min(start + CHUNK, len(features)), device=features.device)
        d = squared_distances(features[rows], features)
        d[torch.arange(len(rows)), rows] = float("inf")  # leave the query out
        idx = d.sort(dim=1, stable=True).indices[:, :max_r]
        hits = (labels[idx] == labels[rows, None]).float()
        r = relevant[rows]
        keep = r > 0
        within_r = (ranks[None, :] <= r[:, None]).float()
        r_precision = (hits * within_r).sum(1) / r.clamp_min(1)
        ap = (hits.cumsum(1) / ranks * hits * within_r).sum(1) / r.clamp_min(1)
        sums += torch.stack([hits[keep, 0].sum(), r_precision[keep].sum(), ap[keep].sum()]).double().cpu()
        used += int(keep.sum())
    return dict(zip(RETRIEVAL_METRICS, (sums / used).tolist()))


def clustering_scores(features: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> tuple[float | None, float | None]:
    """NMI and AMI (arithmetic normalisation, scikit-learn's defaults) of k-means clusters, k = the
    classes present; None for a single class or as many classes as samples, where every clustering
    scores 1 and says nothing.

    scikit-learn's KMeans (k-means++, 3 restarts, seeded) on the host copy of the features: it
    copes with collapsed features (fewer distinct points than clusters) and with very wide ones."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    points = features.float().cpu().numpy()
    k = len(labels.unique())
    if not 1 < k < len(points):
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # collapsed features: fewer distinct clusters than k
        clusters = KMeans(k, n_init=3, random_state=seed).fit_predict(points)
    truth = labels.cpu().numpy()
    return float(normalized_mutual_info_score(truth, clusters)), float(adjusted_mutual_info_score(truth, clusters))


def class_geometry(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """How far apart the classes sit, against how spread each one is. With mu_k the mean of class
    k's features x_i (classes present only):

        intra_distance  = mean_i ||x_i - mu_{y_i}||
        min_center_gap  = min_{k != l} ||mu_k - mu_l||,    mean_center_gap = mean_{k != l} ||mu_k - mu_l||
        min_gap_ratio   = min_center_gap / intra_distance,  mean_gap_ratio = mean_center_gap / intra_distance
        feature_norm    = mean_i ||x_i||

    Gap ratios above 1 mean classes lie further apart than their points lie from their means. All
    NaN for non-finite features (an overflowing model); the gaps and ratios None for a single class,
    the ratios also when intra_distance is 0."""
    features = features.float()
    if not bool(torch.isfinite(features).all()):
        return dict.fromkeys(GEOMETRY_METRICS, float("nan"))
    present, index = labels.unique(return_inverse=True)
    means = torch.zeros(len(present), features.shape[1], device=features.device).index_add_(0, index, features)
    means = means / torch.bincount(index, minlength=len(present))[:, None].float()
    intra = float((features - means[index]).norm(dim=1).mean())
    min_gap = mean_gap = None
    if len(present) > 1:  # the C x C gaps in chunks of rows: 100,000 classes would take 40 GB at once
        k, step, low, total = len(present), chunk_rows(len(present)), float("inf"), 0.0
        for start in range(0, k, step):
            gaps = squared_distances(means[start : start + step], means).clamp_min(0).sqrt()
            rows = torch.arange(len(gaps), device=gaps.device)
            gaps[rows, rows + start] = float("inf")  # a class's distance to itself is no pair
            low = min(low, float(gaps.min()))
            total += float(gaps.masked_fill(gaps == float("inf"), 0).sum(dtype=torch.float64))
        min_gap, mean_gap = low, total / (k * (k - 1))
    return {
        "intra_distance": intra,
        "min_center_gap": min_gap,
        "mean_center_gap": mean_gap,
        "min_gap_ratio": min_gap / intra if min_gap is not None and intra > 0 else None,
        "mean_gap_ratio": mean_gap / intra if mean_gap is not None and intra > 0 else None,
        "feature_norm": float(features.norm(dim=1).mean()),
    }


def center_distance_ratio(features: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean distance of a feature to its class mean over the mean distance between the means of the
    classes present (distinct pairs): below 1 when classes are tighter than they are apart
    (1 / mean_gap_ratio); None with a single class, which has no distance between means."""
    geometry = class_geometry(features, labels)
    return geometry["intra_distance"] / geometry["mean_center_gap"] if geometry["mean_center_gap"] else None


def feature_metrics(
    test: torch.Tensor, test_labels: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor, seed: int = 0
) -> dict[str, float | None]:
    """All retrieval and clustering metrics of the test features (train features as the k-NN gallery);
    all NaN when a feature is not finite (an overflowing model), where none of them means anything;
    None (null in summary.json, empty in metrics.csv) for those a tiny or single-class test set
    cannot give: see retrieval_scores, clustering_scores and center_distance_ratio."""
    if not (torch.isfinite(test).all() and torch.isfinite(train).all()):
        return dict.fromkeys(FEATURE_METRICS, float("nan"))
    nmi, ami = clustering_scores(test, test_labels, seed)
    return {
        "knn1_acc": knn_accuracy(test, test_labels, train, train_labels, 1),
        "knn10_acc": knn_accuracy(test, test_labels, train, train_labels, 10),  # k = 10, or the train set's size if smaller
        **retrieval_scores(test, test_labels),
        "nmi": nmi,
        "ami": ami,
        "center_distance_ratio": center_distance_ratio(test, test_labels),
    }
