"""The NPEFF estimator, which factorises per-example Fishers into shared components with non-negative
coefficients.

The method is §2.2 and App. D of the paper.

The API follows scikit-learn's ``NMF``: hyper-parameters in ``__init__`` (checked against the table
``npeff_lens.constraints`` by :func:`validate_params`), ``fit`` / ``transform`` / ``fit_transform``,
learned state ending in ``_``. As there, the estimator only orchestrates: the solver is
:func:`npeff_lens.nmf.npeff_factorization` (its steps in :mod:`npeff_lens.nmf`), the PEFs are read through
:mod:`npeff_lens.sources` (a tensor or a :class:`~npeff_lens.sources.PEFSource` such as a ``PEFStore``, resident or
streamed), checkpoints are :mod:`npeff_lens.checkpoints`, and a fitted estimator is saved through
:mod:`npeff_lens.saving` (tensors with a checksum, ``config.json`` beside them).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__, pretrained
from .config import validate_params
from .errors import NotFittedError, warn_caller
from .nmf import factorize
from .saving import SavedFormat
from .sources import as_source, manifest_of, rank_and_world, resolve_dtype

__all__ = ["NPEFF", "validate_params"]

logger = logging.getLogger(__name__)

_DEAD_THRESHOLD = 1e-8  # a column whose largest normalised coefficient is below this is dead
SAVED = SavedFormat("NPEFF", "npeff.safetensors", "config.json", what="an NPEFF decomposition")


def _check_same_space(fit_manifest: dict, manifest: dict) -> None:
    """PEFs given to ``transform`` must live in the space the components were fitted in."""
    for key in sorted(set(fit_manifest) & set(manifest)):
        if ("projection" in key or "layout" in key) and fit_manifest[key] != manifest[key]:
            raise ValueError(
                f"the PEFs' manifest entry {key!r} differs from the one the decomposition was fitted on "
                f"({manifest[key]!r} != {fit_manifest[key]!r}): the components live in another space"
            )


# ----------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------


def _typed(params: dict) -> dict:
    """Params with their types: ``3`` and ``3.0`` compare equal, but only one of them is a valid ``n_steps``."""
    return {k: (type(v), v) for k, v in params.items()}


class NPEFF:
    """Non-Negative Per-Example Fisher Factorization: the estimator that finds a model's processing strategies.

    ``fit`` decomposes each example's PEF ``F_i`` (unit Frobenius norm) into a non-negative combination of
    ``n_components`` shared rank-1 matrices: ``F_i ≈ Σ_j W_ij h_j h_jᵀ``. The components ``h_j`` (the
    pseudo-Fisher vectors, ``components_``) are directions in the projected parameter space; the coefficients
    ``W`` (``coefficients_``, "example component") say how much each example uses each component. ``transform``
    fits the coefficients of new PEFs with the components fixed. The API follows scikit-learn's ``NMF``.

    The input PEFs are a :class:`~npeff_lens.store.PEFStore` (read in batches, streamed when larger than
    ``memory_budget``), any :class:`~npeff_lens.sources.PEFSource`, or a tensor "example rank dim".

    Example:
        >>> import npeff_lens as nl
        >>> store = nl.PEFStore("runs/movie")
        >>> npeff = nl.NPEFF(n_components=32, n_steps=500).fit(store)
        >>> npeff.coefficients_.shape, npeff.components_.shape     # [m, 32], [32, d]
        >>> npeff.save("runs/movie/npeff")
        >>> npeff = nl.NPEFF.load("runs/movie/npeff")
        >>> W_new = npeff.transform(other_store)                   # coefficients of other examples

    Parameters
    ----------
    n_components : int
        Number C of components (rank-1 PSD matrices ``h_j h_j^T``).
    n_steps : int, default 1000
        Joint steps (a W update, App. D.1, then an H gradient step, App. D.2) after the warm-up.
    n_warmup_steps : int, default 100
        H-only steps with W frozen at its initialisation, first (App. D.4).
    lr, warmup_lr : float, default 0.5 / 0.5
        Learning rates of the H gradient step, applied to the gradient of the *mean* per-example loss
        (the sum of App. D.2 divided by the number m of examples), so the same value works for any m
        and d: the PEFs have unit norm, so the curvature of the mean loss in H is O(1) in the joint
        phase. During the warm-up (W ~ U[0, 1] frozen) the curvature is about ``||mean PEF||_op``,
        which shrinks like 1/C for diverse data: with hundreds of components a larger ``warmup_lr``
        (up to ~0.1 C) shortens the warm-up. Too large a value shows as a "loss rose" warning or a
        FloatingPointError. (0.5 recovers planted decompositions with C = 6 ... 64; 3 diverges at C = 6.)
    init : {"random", "custom"}, default "random"
        "random": W ~ U[0, 1], H ~ N(0, 2 / (C d)) (App. D.4); "custom": ``fit(pefs, W=..., H=...)``.
    seed : int, default 0
        Seeds the initialisation; the fit is deterministic given the seed (and the device).
    eps : float, default 1e-12
        Added to the denominator of the multiplicative W update.
    device, dtype :
        Where and in which precision to compute (``None`` device: CUDA when available, else CPU).
        W, H, the per-example norms and every product and reduction are in ``dtype``.
    storage_dtype : torch dtype, its name or None, default None
        The precision the PEFs G are held in on the device (``None``: ``dtype``). ``"bfloat16"`` halves
        their memory (and what ``memory_budget`` counts, and the host-to-device traffic when streaming):
        each chunk of examples is cast to ``dtype`` just before use, so products still accumulate in
        ``dtype``; only G's values are rounded (about 3 significant digits). The matmul precision is
        left as torch has it (``torch.backends.cuda.matmul.allow_tf32``): bf16 storage does not turn on
        TF32.
    memory_budget : int, default 4 GiB
        Bytes for resident PEFs on this rank (in ``storage_dtype``); above it the input is streamed every step.
    batch_size : int or None
        Examples per streamed batch (``None``: the store's default) and per in-memory chunk
        (``None``: chunks whose temporaries fit 256 MiB).
    nonfinite : {"raise", "exclude"}, default "raise"
        PEFs containing NaN/inf raise a ``SettingError`` (a ValueError), or are excluded with a warning. PEFs with zero
        norm are always excluded with a warning; excluded examples get coefficients 0.
    checkpoint_dir, checkpoint_every :
        Save the state every ``checkpoint_every`` steps (atomically); a new fit with the same
        ``checkpoint_dir`` and data resumes from the latest checkpoint and ends where an
        uninterrupted fit would. A checkpoint of another fit (other data, seed, learning rates, ...)
        is a ``ConfigMismatchError`` (a ValueError) naming each differing field.
    callback : callable or None
        ``callback(step, loss)`` after each step (1-based ``step``); an exception stops the fit.
    progress : bool, default True
        A tqdm bar over the steps showing the loss (rank 0 only).
    verbose : int, default 0
        >0 logs a summary line at the end of ``fit`` (level INFO, logger ``npeff_lens.decomposition``; rank 0).

    Attributes
    ----------
    coefficients_ : Tensor [m, C]
        Non-negative coefficients for the unit-norm PEFs, rescaled for unit-norm components.
    components_ : Tensor [C, d]
        Pseudo-Fisher vectors ``h_j``, unit L2 norm (so ``h_j h_j^T`` has unit Frobenius norm).
    loss_history_ : Tensor [n_iter_ + 1]
        Mean per-example loss after 0, 1, ... steps (1.0 is the loss of reconstructing nothing).
    w_step_loss_history_ : Tensor [n_iter_]
        Loss right after the W update of each step (the loss before it, for warm-up steps).
    reconstruction_err_ : float
        ``loss_history_[-1]``.
    n_iter_ : int
        Steps performed (warm-up + joint).
    pef_norms_ : Tensor [m]
        ``||G_i^T G_i||_F`` of the input PEFs (NaN where non-finite).
    excluded_ : BoolTensor [m]
        Examples left out of the fit (zero or non-finite PEF).
    dead_components_ : LongTensor
        Components whose coefficient column went to zero (max < 1e-8).
    manifest_ : dict
        The input store's manifest (parameter layout, projection seed and dims, ...).

    Notes
    -----
    The objective is §2.2 of the paper; the W update, the H step, data parallelism and the initialisation are
    App. D.1 to D.4. The solver itself is :func:`npeff_lens.nmf.npeff_factorization`.
    """

    def __init__(
        self,
        n_components: int,
        *,
        n_steps: int = 1000,
        n_warmup_steps: int = 100,
        lr: float = 0.5,
        warmup_lr: float = 0.5,
        init: str = "random",
        seed: int = 0,
        eps: float = 1e-12,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        storage_dtype: torch.dtype | str | None = None,
        memory_budget: int = 4 * 2**30,
        batch_size: int | None = None,
        nonfinite: str = "raise",
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        callback: Callable[[int, float], Any] | None = None,
        progress: bool = True,
        verbose: int = 0,
    ):
        self.n_components = n_components
        self.n_steps = n_steps
        self.n_warmup_steps = n_warmup_steps
        self.lr = lr
        self.warmup_lr = warmup_lr
        self.init = init
        self.seed = seed
        self.eps = eps
        self.device = device
        self.dtype = dtype
        self.storage_dtype = storage_dtype
        self.memory_budget = memory_budget
        self.batch_size = batch_size
        self.nonfinite = nonfinite
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.callback = callback
        self.progress = progress
        self.verbose = verbose

    # -- scikit-learn conveniences ---------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> NPEFF:
        for name, value in params.items():
            if name not in self._param_names():
                raise ValueError(f"invalid parameter {name!r} for NPEFF")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        shown = [f"n_components={self.n_components!r}"]
        for name in self._param_names()[1:]:
            value = getattr(self, name)
            if value is not defaults.get(name) and value != defaults.get(name):
                shown.append(f"{name}={value!r}")
        return f"NPEFF({', '.join(shown)})"

    @classmethod
    def from_config(cls, config, **params) -> NPEFF:
        """The estimator of a :class:`~npeff_lens.config.DecomposeConfig`, with ``params`` (e.g. ``checkpoint_dir``)
        added or replaced. A config checked its fields when it was built, so only ``params`` are checked here, and
        ``fit`` checks again only what is set after."""
        validate_params(params)
        est = cls(**{**config.estimator_params(), **params})
        est._checked_params = _typed(est.get_params())
        return est

    def _validate(self) -> dict:
        """The hyper-parameters, checked once per set of values (``set_params`` or an assignment makes a new set;
        ``from_config`` starts from its config's checked values)."""
        params = self.get_params()
        if _typed(params) != getattr(self, "_checked_params", None):
            validate_params(params)
            self._checked_params = _typed(params)
        return params

    def _solver_params(self) -> dict:
        """The hyper-parameters of :func:`~npeff_lens.nmf.factorize`, checked: every one but ``verbose``."""
        params = self._validate()
        params.pop("verbose")
        return params

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, pefs, y=None, *, W: torch.Tensor | None = None, H: torch.Tensor | None = None) -> NPEFF:
        """Learn the components and the coefficients of the given PEFs.

        Args:
            pefs: a tensor "example rank dim" (or "example dim" for one row per example), or a
                :class:`~npeff_lens.sources.PEFSource` such as a ``PEFStore``.
            y: ignored (scikit-learn's signature).
            W: initial coefficients "example component", used when ``init="custom"``.
            H: initial components "component dim", used when ``init="custom"``.

        Returns:
            The estimator itself, with ``components_``, ``coefficients_`` and the other attributes set. The
            solver is :func:`~npeff_lens.nmf.npeff_factorization`.
        """
        fitted = factorize(pefs, self._solver_params(), W=W, H=H)
        self.components_ = fitted.H
        self.coefficients_ = fitted.W
        self.pef_norms_ = fitted.pef_norms
        self.excluded_ = fitted.excluded
        self.loss_history_ = fitted.loss_history
        self.w_step_loss_history_ = fitted.w_step_loss_history
        self.reconstruction_err_ = float(fitted.loss_history[-1])
        self.n_iter_ = fitted.n_iter
        self.n_features_in_ = int(fitted.H.shape[1])
        self.n_rows_ = fitted.n_rows
        self.manifest_ = fitted.manifest
        self._set_dead()
        if self.verbose and rank_and_world()[0] == 0:
            logger.info(
                "NPEFF: %d steps, loss %.5f -> %.5f, %d dead components",
                self.n_iter_,
                float(fitted.loss_history[0]),
                self.reconstruction_err_,
                len(self.dead_components_),
            )
        return self

    def _set_dead(self) -> None:
        colmax = self.coefficients_.max(0).values if self.coefficients_.shape[0] else torch.zeros(self.n_components)
        dead = (colmax < _DEAD_THRESHOLD).nonzero().flatten()
        self.dead_components_ = dead
        if len(dead):
            warn_caller(
                f"NPEFF: {len(dead)} of {self.n_components} components are dead (coefficient column went to zero): "
                f"{dead[:20].tolist()}{' ...' if len(dead) > 20 else ''}; a longer warm-up or a smaller lr may help",
                RuntimeWarning,
            )

    # -- transform ------------------------------------------------------------------------------
    def transform(self, pefs, n_steps: int | None = None) -> torch.Tensor:
        """Fit the coefficients of new PEFs with the components fixed.

        Only the coefficient updates run, as in ``npeff_factorization(pefs, H=components_, update_H=False)``.

        Args:
            pefs: PEFs in the same projected space as the fit's (a tensor or a ``PEFStore``); the data are read
                once.
            n_steps: coefficient updates (default: the estimator's ``n_steps``, at least 500).

        Returns:
            The coefficients ``[m, C]``, one row per example.
        """
        self._check_fitted()
        n_steps = max(self.n_steps, 500) if n_steps is None else n_steps
        source = as_source(pefs)
        if int(source.dim) != self.n_features_in_:
            raise ValueError(f"PEFs have dim {source.dim}; the components have {self.n_features_in_}")
        _check_same_space(self.manifest_, manifest_of(source))
        params = {**self._solver_params(), "n_steps": n_steps, "progress": False}
        validate_params({"n_steps": n_steps})
        return factorize(source, params, H=self.components_, update_H=False).W

    def fit_transform(
        self, pefs, y=None, *, W: torch.Tensor | None = None, H: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fit the estimator (as :meth:`fit`) and return ``coefficients_`` ``[m, C]``."""
        return self.fit(pefs, W=W, H=H).coefficients_

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise NotFittedError("this NPEFF instance is not fitted yet; call fit first")

    # -- persistence ------------------------------------------------------------------------------
    _TENSORS = (
        "coefficients_",
        "components_",
        "loss_history_",
        "w_step_loss_history_",
        "pef_norms_",
        "excluded_",
        "dead_components_",
    )

    def save(self, directory: str | os.PathLike) -> Path:
        """Save the fitted estimator into ``directory`` and return its path.

        The directory gets ``npeff.safetensors`` (the learned tensors, with a checksum) and ``config.json`` (the
        hyper-parameters, the fitted scalars and the store's manifest), written last. :meth:`load` reads it back.
        """
        self._check_fitted()
        if rank_and_world()[0] != 0:
            return Path(directory)
        params = self.get_params()
        params.pop("callback")
        params["dtype"] = str(resolve_dtype(self.dtype)).replace("torch.", "")
        if self.storage_dtype is not None:
            params["storage_dtype"] = str(resolve_dtype(self.storage_dtype, "storage_dtype")).replace("torch.", "")
        params["device"] = None if self.device is None else str(self.device)
        params["checkpoint_dir"] = None if self.checkpoint_dir is None else str(self.checkpoint_dir)
        config = {
            "npeff_lens_version": __version__,
            "params": params,
            "fitted": {
                "n_iter_": self.n_iter_,
                "reconstruction_err_": self.reconstruction_err_,
                "n_features_in_": self.n_features_in_,
                "n_rows_": self.n_rows_,
                "n_examples": int(self.coefficients_.shape[0]),
            },
            "manifest": self.manifest_,
        }
        return SAVED.save(directory, {k: getattr(self, k) for k in self._TENSORS}, config)

    # -- the Hugging Face hub (npeff_lens.pretrained; npeff_lens.hub for run directories) -------------
    def save_pretrained(self, directory, **kwargs) -> Path:
        """``config.json`` + ``npeff.safetensors``, the run's configs and a model card (``npeff_lens.pretrained``);
        ``kwargs``: ``store_manifest``, ``run_configs``, ``tunings``, ``repo_id``."""
        return pretrained.write_folder(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, dir_or_repo_id, **kwargs):
        """A decomposition from a local folder or a hub repository (offline: a one-line error)."""
        return pretrained.from_pretrained(dir_or_repo_id, cls, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Uploads :meth:`save_pretrained`'s folder to ``repo_id``; returns the commit URL."""
        return pretrained.push_estimator(self, repo_id, **kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> NPEFF:
        """Load the estimator that :meth:`save` wrote into ``directory``.

        A damaged ``npeff.safetensors`` raises a ``CorruptFileError`` naming it.
        """
        config, tensors = SAVED.load(directory)
        valid = set(cls._param_names())
        est = cls(**{k: v for k, v in config["params"].items() if k in valid})
        for k, v in tensors.items():
            setattr(est, k, v)
        for k, v in config["fitted"].items():
            if k.endswith("_"):
                setattr(est, k, v)
        est.manifest_ = config.get("manifest", {})
        return est
