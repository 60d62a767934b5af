"""The paper's two applications of NPEFF: guided unlearning and a comparison of zero-shot with in-context learning.

:mod:`.unlearning` unlearns an example with NPEFF-guided mitigation (§6.1, App. I); :mod:`.icl` builds a
classifier from component tunings and compares zero-shot processing with in-context learning (§6.2).

Both take adapters, tasks, coefficient tensors and lists of prompts, and return JSON-able results; the run layer
(``npeff unlearn`` / ``npeff icl``) owns directories.
"""

from __future__ import annotations

from ..io import lazy_exports

_LAZY = {
    "unlearn": "npeff_lens.applications.unlearning",
    "unlearning_experiment": "npeff_lens.applications.unlearning",
    "TuningClassifier": "npeff_lens.applications.icl",
    "best_of_n_icl": "npeff_lens.applications.icl",
    "icl_experiment": "npeff_lens.applications.icl",
    "zero_shot_predictions": "npeff_lens.applications.icl",
    "agreement": "npeff_lens.applications.icl",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)


def __dir__():
    return __all__
