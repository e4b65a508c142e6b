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
FEATURE_METRICS = ("knn1_acc", "knn10_acc", "precision_at_1", "map_at_r", "nmi", "ami", "center_distance_ratio")


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


def leave_one_out_retrieval(features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Precision@1 and MAP@R of the set as its own gallery, each query excluded from its results.

    For a query with R other samples of its class, MAP@R = (1/R) sum_{i<=R} P(i) rel(i), where
    rel(i) says whether the i-th nearest neighbour shares the label and P(i) is the precision of
    the first i neighbours (Musgrave et al., 2020). Both are averaged over queries; queries alone in
    their class are skipped.
    """
    features = features.float()
    counts = torch.bincount(labels)
    relevant = counts[labels] - 1
    max_r = int(relevant.max())
    p_at_1, map_at_r, used = 0.0, 0.0, 0
    for start in range(0, len(features), CHUNK):
        rows = torch.arange(start, min(start + CHUNK, len(features)), device=features.device)
        d = squared_distances(features[rows], features)
        d[torch.arange(len(rows)), rows] = float("inf")  # leave the query out
        idx = d.topk(max_r, dim=1, largest=False).indices
        hits = (labels[idx] == labels[rows, None]).float()
        r = relevant[rows]
        keep = r > 0
        ranks = torch.arange(1, max_r + 1, device=features.device, dtype=torch.float32)
        within_r = ranks[None, :] <= r[:, None]
        precision = hits.cumsum(1) / ranks
        ap = (precision * hits * within_r).sum(1) / r.clamp_min(1)
        p_at_1 += float(hits[keep, 0].sum())
        map_at_r += float(ap[keep].sum())
        used += int(keep.sum())
    return p_at_1 / max(used, 1), map_at_r / max(used, 1)


def clustering_scores(features: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """NMI and AMI (arithmetic normalisation, scikit-learn's defaults) of k-means clusters, k = classes.

    scikit-learn's KMeans (k-means++, 3 restarts, seeded) on the host copy of the features: it
    copes with collapsed features (fewer distinct points than clusters) and with very wide ones."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    points = features.float().cpu().numpy()
    if len(points) < int(labels.max()) + 1:  # fewer samples than clusters: no clustering to score
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # collapsed features: fewer distinct clusters than k
        clusters = KMeans(int(labels.max()) + 1, n_init=3, random_state=seed).fit_predict(points)
    truth = labels.cpu().numpy()
    return float(normalized_mutual_info_score(truth, clusters)), float(adjusted_mutual_info_score(truth, clusters))


def center_distance_ratio(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean distance of a feature to its class mean over the mean distance between class means
    (distinct pairs): below 1 when classes are tighter than they are apart."""
    features = features.float()
    num_classes = int(labels.max()) + 1
    means = torch.zeros(num_classes, features.shape[1], device=features.device).index_add_(0, labels, features)
    means = means / torch.bincount(labels, minlength=num_classes).clamp_min(1)[:, None].float()
    intra = (features - means[labels]).norm(dim=1).mean()
    if num_classes < 2:
        return float("nan")
    pair_sum = 0.0  # the C x C distances in chunks of rows: 100,000 classes would take 40 GB at once
    step = chunk_rows(num_classes)
    for start in range(0, num_classes, step):
        pair = squared_distances(means[start : start + step], means).sqrt()
        rows = torch.arange(len(pair), device=pair.device)
        pair[rows, rows + start] = 0.0  # a class's distance to itself is no pair
        pair_sum += float(pair.sum(dtype=torch.float64))
    return float(intra) / (pair_sum / (num_classes * (num_classes - 1)))


def feature_metrics(
    test: torch.Tensor, test_labels: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor, seed: int = 0
) -> dict[str, float]:
    """All retrieval and clustering metrics of the test features (train features as the k-NN gallery);
    all NaN when a feature is not finite (an overflowing model), where none of them means anything."""
    if not (torch.isfinite(test).all() and torch.isfinite(train).all()):
        return dict.fromkeys(FEATURE_METRICS, float("nan"))
    p_at_1, map_at_r = leave_one_out_retrieval(test, test_labels)
    nmi, ami = clustering_scores(test, test_labels, seed)
    return {
        "knn1_acc": knn_accuracy(test, test_labels, train, train_labels, 1),
        "knn10_acc": knn_accuracy(test, test_labels, train, train_labels, 10),  # k = 10, or the train set's size if smaller
        "precision_at_1": p_at_1,
        "map_at_r": map_at_r,
        "nmi": nmi,
        "ami": ami,
        "center_distance_ratio": center_distance_ratio(test, test_labels),
    }
