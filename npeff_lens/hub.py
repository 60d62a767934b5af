"""Sharing a run's decomposition on the Hugging Face Hub, or as a folder the Hub understands.

It saves a decomposition, a decomposition directory or a run directory in the format of
:mod:`npeff_lens.pretrained`, loads one back, and pushes it to the Hub.

>>> from npeff_lens.hub import save_pretrained, from_pretrained, push_to_hub
>>> save_pretrained("runs/movie/npeff", "hub/movie-npeff")     # config.json, npeff.safetensors, README.md, ...
>>> npeff = from_pretrained("hub/movie-npeff")                 # or a Hub repo id
>>> push_to_hub("hub/movie-npeff", "me/smollm2-movie-npeff")

For a directory, the folder also records the configs of the steps that made it (the collection manifest, the
decomposition's ``run.json``) and, when the decomposition's PEF store is reachable, the headline tunings.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .analysis import tuning_summary
from .decomposition import NPEFF
from .io import read_json
from .pretrained import RUN_CONFIGS, HubError, decomposition_dir, model_card, upload_folder, write_folder
from .pretrained import from_pretrained as _from_pretrained
from .rundir import load_run

__all__ = ["save_pretrained", "from_pretrained", "push_to_hub", "load_decomposition", "model_card", "HubError"]


def load_decomposition(path) -> NPEFF:
    """Load the fitted NPEFF estimator saved in a directory.

    Args:
        path: a decomposition directory (``npeff decompose``'s ``--out``), a ``save_pretrained`` folder, or a run
            directory holding one decomposition (its ``npeff/``, else the one subdirectory whose ``run.json``
            says ``decompose``).

    Returns:
        The :class:`~npeff_lens.decomposition.NPEFF` estimator, with its components, coefficients and the
        manifest of the store it was fitted on.

    Example:
        >>> import npeff_lens as nl
        >>> npeff = nl.load_decomposition("runs/movie")        # finds runs/movie/npeff
        >>> npeff.components_.shape
    """
    return NPEFF.load(decomposition_dir(Path(path)))


def _run_configs(directory: Path) -> dict[str, Any]:
    """The configs of the steps behind a decomposition directory: its run.json, its store's manifest."""
    configs: dict[str, Any] = {}
    if (directory / "run.json").is_file():
        rec = read_json(directory / "run.json")
        configs["decompose"] = rec
        src = rec.get("source") or {}
        for cand in (directory / src["relative"] if "relative" in src else None, src.get("absolute")):
            if cand is not None and (Path(cand) / "manifest.json").is_file():
                configs["collect"] = read_json(Path(cand) / "manifest.json")
                break
    if (directory / RUN_CONFIGS).is_file():  # a save_pretrained folder: keep what it had
        configs = {**read_json(directory / RUN_CONFIGS), **configs}
    return configs


def _tunings(directory: Path | None, k: int = 16) -> dict | None:
    """§3.1 tuning fractions when the decomposition's store (its labels and predictions) is reachable."""
    if directory is None:
        return None
    try:
        est, store = load_run(directory)
    except (OSError, ValueError):
        return None
    meta = store.read_metadata()
    labels, preds = store.example_labels(meta), store.example_predictions(meta)
    out = tuning_summary(est.coefficients_, labels=labels, predictions=preds, k=k)
    out.pop("tunings")
    return out


def save_pretrained(
    npeff_or_dir,
    out_dir,
    *,
    store_manifest: dict | None = None,
    run_configs: dict | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write a Hub-ready folder for an NPEFF or a decomposition / run directory.

    ``store_manifest``: the PEF store's manifest, when the NPEFF lacks one (its ``manifest_`` otherwise);
    ``run_configs``: ``{step: config}`` to record (a directory's run.json and store manifest are found
    anyway); ``repo_id``: named in the card's loading snippet. Returns ``out_dir``.
    """
    if isinstance(npeff_or_dir, NPEFF):
        est, directory = npeff_or_dir, None
    else:
        directory = decomposition_dir(Path(npeff_or_dir))
        est = NPEFF.load(directory)
    out = Path(out_dir)
    if directory is not None and out.resolve() == directory.resolve():
        raise ValueError(f"out_dir {out} is the decomposition itself: choose another folder")
    configs = {**(_run_configs(directory) if directory is not None else {}), **(run_configs or {})}
    tunings = _tunings(directory) if directory is not None else None
    return write_folder(est, out, store_manifest=store_manifest, run_configs=configs, tunings=tunings, repo_id=repo_id)


def from_pretrained(dir_or_repo_id, **download_kwargs) -> NPEFF:
    """An NPEFF from a local folder (any :func:`load_decomposition` accepts) or a Hub repo id
    (``huggingface_hub.snapshot_download``; ``download_kwargs``: ``revision``, ``token``, ``cache_dir``...)."""
    return _from_pretrained(dir_or_repo_id, NPEFF, **download_kwargs)


def push_to_hub(out_dir_or_npeff, repo_id: str, **kwargs) -> str:
    """Upload a ``save_pretrained`` folder (an NPEFF or a decomposition directory is saved first, into a
    temporary folder) to the Hub model repo ``repo_id`` (created if needed). Returns the commit URL.
    ``kwargs``: ``private``, ``token``, ``commit_message``, and ``HfApi.upload_folder``'s (``revision``, ...)."""
    with tempfile.TemporaryDirectory(prefix="npeff_hub_") as tmp:
        folder = out_dir_or_npeff
        if isinstance(out_dir_or_npeff, NPEFF) or not (Path(out_dir_or_npeff) / "README.md").is_file():
            folder = save_pretrained(out_dir_or_npeff, Path(tmp) / "folder", repo_id=repo_id)
        return upload_folder(folder, repo_id, **kwargs)
