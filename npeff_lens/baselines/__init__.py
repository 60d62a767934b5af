"""Baselines that NPEFF is compared with (§5), each scored by the same metrics (``npeff_lens.analysis``):

- ``gradient_clustering``: gradient clustering (§5.1): the gradient of ``log p(argmax | x)`` per example,
  collected by the same engine as the PEFs, unit-normalised and clustered with k-means
  (:class:`~npeff_lens.baselines.gradient_clustering.GradientClustering`).
- ``sae``: TopK sparse autoencoders on activations (§5.2).
- ``snmf``: semi-non-negative matrix factorisation of MLP hidden activations (Shafran, Geiger and Geva, 2025)
  (:class:`~npeff_lens.baselines.snmf.SNMFBaseline`).

Names are imported lazily, so ``import npeff_lens.baselines`` costs nothing; scikit-learn and sae-lens
load only when a baseline is fitted.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "GradientClustering": "npeff_lens.baselines.gradient_clustering",
    "collect_prediction_gradients": "npeff_lens.baselines.gradient_clustering",
    "prediction_task": "npeff_lens.baselines.gradient_clustering",
    "SNMFBaseline": "npeff_lens.baselines.snmf",
    "TopKSAEBaseline": "npeff_lens.baselines.sae",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'npeff_lens.baselines' has no attribute {name!r}")
