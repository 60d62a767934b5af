"""Gradient clustering, the parameter-space baseline NPEFF is compared with: k-means on per-example gradients.

The method is Michaud et al., 2024 and Marks et al., 2024; the paper compares with it in §5.1.

Per example, the gradient ``∇θ log p(y' | x)`` of the log-probability of the model's own prediction
``y' = argmax p(y|x)`` (the paper's label-free variant), randomly projected like the PEFs, is normalised to
unit L2 norm; k-means clusters the normalised gradients. Within a cluster, examples are ranked by
proximity to its centroid.

The gradients come from the PEF collection engine itself (``collect_pefs`` with the task's
``rows="prediction"``: one LRM-PEF row, the gradient of ``log p(argmax | x)``), so they share its
projection, parameter selection, store, resume and flags; k-means is scikit-learn's. The clusters are
exposed as non-negative coefficients ``[m, C]`` so that ``npeff_lens.analysis`` scores them exactly as it
scores NPEFF's components.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..collect import collect_pefs
from ..errors import NotFittedError
from ..saving import SavedFormat
from ..tasks import TASKS, task_from_config

__all__ = [
    "GradientClustering",
    "collect_prediction_gradients",
    "prediction_task",
    "cluster_coefficients",
    "MINIBATCH_ABOVE",
]

MINIBATCH_ABOVE = 2**27  # algorithm="auto": MiniBatchKMeans once m x n_clusters exceeds this (65,536 x 2,048)
_CHUNK = 4096  # examples per block when computing distances to centroids
_TENSORS = ("cluster_centers_", "labels_", "distances_", "excluded_")
SAVED = SavedFormat("GradientClustering", "gradient_clustering.safetensors", "config.json")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# One constraint per __init__ argument: (check, what it must be).
_CONSTRAINTS = {
    "n_clusters": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "seed": (_is_int, "an int"),
    "batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "None or an int >= 1"),
    "n_init": (lambda v: v == "auto" or (_is_int(v) and v >= 1), "'auto' or an int >= 1"),
    "max_iter": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "tol": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "a float >= 0"),
    "algorithm": (lambda v: v in ("auto", "full", "minibatch"), "'auto', 'full' or 'minibatch'"),
}


def prediction_task(task):
    """A copy of ``task`` whose LRM-PEF is the single row ``∇θ log p(y'|x)``, ``y' = argmax p(y|x)`` (§5.1).

    Works for every task kind (``LabelTokens``, ``ClassifierHead``, ``NextToken``): the copy is rebuilt from
    ``task.config()`` with ``rows="prediction"``, so the outcome set, template and (for ``NextToken``) the
    expectation-projection settings are the same; a task class outside ``npeff_lens.tasks.TASKS`` is
    shallow-copied instead.
    """
    if TASKS.get(task.kind) is type(task):
        return task_from_config({**task.config(), "rows": "prediction"})
    out = copy.copy(task)
    out.rows = "prediction"
    return out


def collect_prediction_gradients(model, data, task, out, **options):
    """Gradient clustering's inputs (§5.1): per example, the (projected) gradient of ``log p(argmax | x)``
    into a ``PEFStore`` ``[m, 1, d]`` at ``out``.

    The same call as :func:`npeff_lens.collect.collect_pefs` with :func:`prediction_task` ``(task)``: same
    ``options`` (``proj_dim``, ``density``, ``seed``, ``params``, ``n``, ``batch_size``, ``config``, ...),
    same projection, resume and per-example metadata. An example whose prediction is certain
    (``p(y'|x) = 1``) has a zero gradient and is flagged ``zero_pef``; :class:`GradientClustering` leaves it
    out.
    """
    return collect_pefs(model, data, prediction_task(task), out, **options)


def _gradients(pefs) -> tuple[torch.Tensor, dict]:
    """``(G [m, d] float32, manifest)`` from a store / anything with ``load_pefs()`` / a tensor or array."""
    manifest = dict(getattr(pefs, "manifest", None) or {})
    if hasattr(pefs, "load_pefs"):
        g = pefs.load_pefs()
    else:
        g = torch.as_tensor(pefs)
    if g.ndim == 3:
        if g.shape[1] != 1:
            raise ValueError(
                f"gradient clustering takes one gradient per example ([m, 1, d] or [m, d]); got {g.shape[1]} rows "
                "per example: collect them with collect_prediction_gradients (or prediction_task(task))"
            )
        g = g[:, 0]
    if g.ndim != 2:
        raise ValueError(f"gradients must be [m, 1, d] or [m, d]; got shape {tuple(g.shape)}")
    return g.float(), manifest


def _unit_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unit-norm rows of the valid examples, valid mask [m])``; zero or non-finite norms are invalid."""
    norms = torch.linalg.vector_norm(g, dim=1, dtype=torch.float64)  # float64: no overflow of the squares
    valid = torch.isfinite(norms) & (norms > 0)
    x = (g[valid].double() / norms[valid, None]).float()
    return x, valid


def _member_distances(x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``||x_i - c_{labels_i}||`` per row, in blocks of ``_CHUNK`` rows."""
    out = torch.empty(x.shape[0], dtype=torch.float32)
    for a in range(0, x.shape[0], _CHUNK):
        diff = x[a : a + _CHUNK].double() - centers[labels[a : a + _CHUNK]].double()
        out[a : a + _CHUNK] = diff.norm(dim=1).float()
    return out


def _nearest(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, distances)`` of the nearest centroid of each row (ties: the lowest index)."""
    labels = torch.empty(x.shape[0], dtype=torch.long)
    c = centers.double()
    c2 = (c * c).sum(1)
    for a in range(0, x.shape[0], _CHUNK):
        xb = x[a : a + _CHUNK].double()
        labels[a : a + _CHUNK] = ((xb * xb).sum(1, keepdim=True) - 2 * xb @ c.T + c2).argmin(1)
    return labels, _member_distances(x, centers, labels)


def cluster_coefficients(labels: torch.Tensor, distances: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Coefficients ``[m, C]``: ``1 / (1 + ||x_i - c_j||)`` for the cluster ``j`` of example ``i``, else 0.

    Unit rows and centroids inside the unit ball put the distance in ``[0, 2]``, so a member's coefficient lies
    in ``[1/3, 1]``: always positive, and decreasing in the distance to the centroid. Ranking a column by
    coefficient is the paper's ranking by proximity to the centroid, members before everyone else.
    """
    out = torch.zeros(labels.shape[0], n_clusters, dtype=torch.float32)
    member = labels >= 0
    out[member.nonzero()[:, 0], labels[member]] = 1.0 / (1.0 + distances[member].float())
    return out


class GradientClustering:
    """k-means on unit-normalised prediction gradients (§5.1), shaped like a scikit-learn estimator.

    Parameters
    ----------
    n_clusters : int
        Number of clusters C, in ``[1, number of examples with a usable gradient]``.
    seed : int
        ``random_state`` of k-means (initialisation, mini-batches).
    batch_size : int or None
        Mini-batch size of ``MiniBatchKMeans`` (None: scikit-learn's 1024); unused by full k-means.
    n_init : int or "auto"
        k-means++ initialisations; the best (lowest inertia) is kept. "auto" is scikit-learn's (1 for k-means++).
    max_iter : int
        Lloyd iterations (full) or passes over the data (mini-batch).
    tol : float
        Relative tolerance of full k-means' convergence test.
    algorithm : "auto", "full" or "minibatch"
        ``"full"``: ``sklearn.cluster.KMeans`` (Lloyd); ``"minibatch"``: ``sklearn.cluster.MiniBatchKMeans``;
        ``"auto"``: mini-batch when ``m x n_clusters > MINIBATCH_ABOVE`` (2**27, e.g. 65,536 examples in 2,048
        clusters: one Lloyd pass then costs over 2**28 d flops), full otherwise.

    Attributes
    ----------
    cluster_centers_ : Tensor [C, d]
        Centroids of the unit-norm gradients (norm <= 1).
    labels_ : LongTensor [m]
        Cluster of each example; -1 for excluded examples.
    distances_ : Tensor [m]
        Euclidean distance of each (unit-norm) example to its centroid; inf for excluded examples.
    coefficients_ : Tensor [m, C]
        ``1 / (1 + distances_)`` in the example's own cluster, 0 elsewhere (:func:`cluster_coefficients`), so
        ``analysis.top_examples(coefficients_, k)`` lists a cluster's members closest to its centroid first and
        never a non-member before a member; every analysis metric reads clusters as it reads NPEFF components.
    excluded_ : LongTensor
        Indices of the examples left out: zero or non-finite gradient norm (e.g. a certain prediction,
        flagged ``zero_pef`` by the collector). Their coefficients are 0 everywhere.
    inertia_ : float
        Sum of squared distances of the included examples to their centroids.
    n_iter_ : int
        Iterations (full) or passes (mini-batch) run by the kept k-means run.
    algorithm_ : str
        ``"full"`` or ``"minibatch"``, as resolved from ``algorithm``.
    fit_seconds_ : float
        Wall-clock seconds of normalisation and clustering (reading the gradients excluded).
    n_features_in_ : int
        d.
    manifest_ : dict
        The store's manifest (model, task, projection, layout), when fitted on a store.
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        seed: int = 0,
        batch_size: int | None = None,
        n_init: int | str = "auto",
        max_iter: int = 300,
        tol: float = 1e-4,
        algorithm: str = "auto",
    ):
        self.n_clusters = n_clusters
        self.seed = seed
        self.batch_size = batch_size
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.algorithm = algorithm

    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` arguments, as stored."""
        return {k: getattr(self, k) for k in _CONSTRAINTS}

    def _check_params(self) -> None:
        bad = [
            f"{k} must be {what}, got {getattr(self, k)!r}"
            for k, (ok, what) in _CONSTRAINTS.items()
            if not ok(getattr(self, k))
        ]
        if bad:
            raise ValueError("; ".join(bad))

    def resolve_algorithm(self, m: int) -> str:
        """``"full"`` or ``"minibatch"`` for ``m`` examples (see ``algorithm``)."""
        if self.algorithm != "auto":
            return self.algorithm
        return "minibatch" if m * self.n_clusters > MINIBATCH_ABOVE else "full"

    def _kmeans(self):
        from sklearn.cluster import KMeans, MiniBatchKMeans

        common = dict(n_clusters=int(self.n_clusters), n_init=self.n_init, max_iter=self.max_iter)
        common["random_state"] = int(self.seed)
        if self.algorithm_ == "minibatch":
            return MiniBatchKMeans(batch_size=self.batch_size or 1024, **common)
        return KMeans(algorithm="lloyd", tol=self.tol, copy_x=False, **common)  # x is ours

    def fit(self, pefs, y=None) -> GradientClustering:
        """Cluster the gradients ``pefs``: a ``PEFStore`` from :func:`collect_prediction_gradients`, anything
        with ``load_pefs()``, or a tensor / array ``[m, 1, d]`` or ``[m, d]``. ``y`` is ignored."""
        self._check_params()
        g, self.manifest_ = _gradients(pefs)
        t0 = time.perf_counter()
        m = g.shape[0]
        x, valid = _unit_rows(g)
        del g
        n_valid = int(valid.sum())
        if self.n_clusters > n_valid:
            raise ValueError(
                f"n_clusters={self.n_clusters} exceeds the {n_valid} examples with a usable gradient "
                f"({m} given, {m - n_valid} with a zero or non-finite norm)"
            )
        self.excluded_ = (~valid).nonzero()[:, 0]
        if len(self.excluded_):
            warnings.warn(
                f"{len(self.excluded_)} of {m} example(s) have a zero or non-finite gradient norm and are left "
                "out of the clustering (labels_ -1, coefficients 0); see excluded_",
                stacklevel=2,
            )
        self.algorithm_ = self.resolve_algorithm(n_valid)
        km = self._kmeans().fit(x.numpy())
        self.cluster_centers_ = torch.from_numpy(km.cluster_centers_).float()
        labels = torch.from_numpy(km.labels_).long()
        self.labels_ = torch.full((m,), -1, dtype=torch.long)
        self.labels_[valid] = labels
        self.distances_ = torch.full((m,), float("inf"), dtype=torch.float32)
        self.distances_[valid] = _member_distances(x, self.cluster_centers_, labels)
        self.inertia_ = float(km.inertia_)
        self.n_iter_ = int(km.n_iter_)
        self.n_features_in_ = int(x.shape[1])
        self._coefficients = None
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def fit_predict(self, pefs, y=None) -> torch.Tensor:
        """``fit(pefs).labels_``."""
        return self.fit(pefs).labels_

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise NotFittedError("this GradientClustering is not fitted yet: call fit first")

    @property
    def coefficients_(self) -> torch.Tensor:
        """``[m, C]``, built from ``labels_`` and ``distances_`` (:func:`cluster_coefficients`)."""
        self._check_fitted()
        if getattr(self, "_coefficients", None) is None:
            self._coefficients = cluster_coefficients(self.labels_, self.distances_, int(self.n_clusters))
        return self._coefficients

    def _assign(self, pefs) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        g, _ = _gradients(pefs)
        if g.shape[1] != self.n_features_in_:
            raise ValueError(
                f"the gradients have dimension {g.shape[1]}; the clusters were fitted on {self.n_features_in_}"
            )
        x, valid = _unit_rows(g)
        labels = torch.full((g.shape[0],), -1, dtype=torch.long)
        distances = torch.full((g.shape[0],), float("inf"), dtype=torch.float32)
        labels[valid], distances[valid] = _nearest(x, self.cluster_centers_)
        return labels, distances

    def predict(self, pefs) -> torch.Tensor:
        """Nearest centroid of each (unit-normalised) gradient; -1 for a zero or non-finite one."""
        return self._assign(pefs)[0]

    def transform(self, pefs) -> torch.Tensor:
        """Coefficients ``[m', C]`` of new examples (their nearest centroid), defined as ``coefficients_``."""
        labels, distances = self._assign(pefs)
        return cluster_coefficients(labels, distances, int(self.n_clusters))

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes ``gradient_clustering.safetensors`` (learned tensors, with a checksum) and ``config.json``
        (hyper-parameters, fitted scalars, the store's manifest); ``config.json`` is written last."""
        self._check_fitted()
        tensors = {k: getattr(self, k) for k in _TENSORS}
        fitted = {k: getattr(self, k) for k in ("inertia_", "n_iter_", "algorithm_", "fit_seconds_", "n_features_in_")}
        config = {"npeff_lens_version": __version__, "params": self.get_params()}
        return SAVED.save(directory, tensors, {**config, "fitted": fitted, "manifest": self.manifest_})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GradientClustering:
        """The estimator written by :meth:`save`; a damaged tensors file is a ``CorruptFileError``."""
        config, tensors = SAVED.load(directory)
        est = cls(**config["params"])
        for k, v in tensors.items():
            setattr(est, k, v)
        for k, v in config["fitted"].items():
            setattr(est, k, v)
        est.manifest_ = config.get("manifest") or {}
        est._coefficients = None
        return est

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"GradientClustering({args})"
