"""npeff_lens: Non-Negative Per-Example Fisher Factorization (Matena & Raffel) for interpretability.

The top-level names are imported lazily so that ``import npeff_lens`` needs torch alone; the
model adapters import transformers / transformer-lens / nnsight only when they are used.
"""

from __future__ import annotations

from .io import lazy_exports

__version__ = "0.2.0"

_LAZY = {
    "load_model": "npeff_lens.models",
    "adapt": "npeff_lens.models",
    "ModelAdapter": "npeff_lens.models",
    "load_dataset": "npeff_lens.data",
    "SparseProjection": "npeff_lens.projection",
    "KroneckerProjection": "npeff_lens.projection",
    "Projection": "npeff_lens.projection",
    "collect_pefs": "npeff_lens.collect",
    "PEFStore": "npeff_lens.store",
    "NPEFF": "npeff_lens.decomposition",
    "npeff_factorization": "npeff_lens.nmf",
    "recover": "npeff_lens.recovery",
    "tasks": "npeff_lens.tasks",
    "analysis": "npeff_lens.analysis",
    "compare": "npeff_lens.runs",
    "load_decomposition": "npeff_lens.hub",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__ = lazy_exports(__name__, _LAZY)


def __dir__():
    return __all__
