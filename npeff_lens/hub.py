"""Hub-ready artefacts: a fitted NPEFF decomposition as a folder the Hugging Face Hub understands.

>>> from npeff_lens.hub import save_pretrained, from_pretrained, push_to_hub
>>> save_pretrained("runs/movie/npeff", "hub/movie-npeff")     # config.json, npeff.safetensors, README.md, ...
>>> npeff = from_pretrained("hub/movie-npeff")                 # or a Hub repo id
>>> push_to_hub("hub/movie-npeff", "me/smollm2-movie-npeff")

The folder holds ``config.json`` + ``npeff.safetensors`` (exactly :meth:`NPEFF.save`'s format, so
``NPEFF.load`` reads it too), ``run_configs.json`` (the configs of the steps that made it: the collection
manifest, the decomposition's ``run.json``, ...) and a model card ``README.md`` whose metadata says
``library_name: npeff_lens``, the ``base_model``, the ``datasets`` and ``tags``, and whose body says what was
decomposed (model, task, parameters, projection d, examples, components), the headline tunings (§3.1) and
how to load it. Hub access goes through ``huggingface_hub``; without a network (``HF_HUB_OFFLINE=1``) a
repo id is a one-line error and local folders keep working.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .io import read_json, write_json

__all__ = ["save_pretrained", "from_pretrained", "push_to_hub", "load_decomposition", "model_card"]

RUN_CONFIGS = "run_configs.json"
TAGS = ["npeff", "interpretability", "mechanistic-interpretability", "fisher-information", "npeff_lens"]
# Built-in model names of npeff_lens.load_model -> the Hub checkpoints they are
HUB_MODELS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma-3-270m": "google/gemma-3-270m"}
_GENERIC_DATASETS = {None, "", "user", "texts"}


class HubError(OSError):
    """A Hub operation failed (offline, unknown repo, no permission); the message is one line."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def load_decomposition(path):
    """The NPEFF in ``path``: a decomposition directory (``npeff decompose``), a ``save_pretrained`` folder, or a
    run directory holding one decomposition (``npeff/``, else the one subdirectory whose run.json says
    ``decompose``)."""
    from .decomposition import NPEFF

    return NPEFF.load(_decomposition_dir(Path(path)))


def _decomposition_dir(path: Path) -> Path:
    if (path / "config.json").is_file() and (path / "npeff.safetensors").is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory holding an NPEFF decomposition")
    if (path / "npeff" / "config.json").is_file():
        return path / "npeff"
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if (sub / "config.json").is_file() and (sub / "run.json").is_file():
            if read_json(sub / "run.json").get("step") == "decompose":
                found.append(sub)
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{path} holds {len(found)} decompositions ({', '.join(p.name for p in found)}): pick one")
    raise FileNotFoundError(f"{path} holds no NPEFF decomposition (config.json + npeff.safetensors)")


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
    from .analysis import tuning_summary
    from .rundir import load_run

    try:
        est, store = load_run(directory)
    except (OSError, ValueError):
        return None
    meta = store.read_metadata()
    labels = [r.get("label_name", r.get("label")) for r in meta] if any("label" in r for r in meta) else None
    preds = [r.get("prediction_name", r.get("prediction")) for r in meta]
    out = tuning_summary(est.coefficients_, labels=labels, predictions=preds, k=k)
    out.pop("tunings")
    return out


def _dataset_names(manifest: dict) -> list[str]:
    name = (manifest.get("dataset") or {}).get("name")
    if name in _GENERIC_DATASETS:
        return []
    path = Path(str(name))
    local = path.is_absolute() or path.exists() or path.suffix in (".csv", ".tsv", ".json", ".jsonl", ".parquet")
    return [path.stem if local else str(name)]  # a local file by its name; built-in names and Hub ids as they are


def model_card(est, manifest: dict | None = None, *, tunings: dict | None = None, repo_id: str | None = None):
    """The ``huggingface_hub.ModelCard`` of a decomposition (metadata and body: the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    man = manifest if manifest is not None else (est.manifest_ or {})
    model = (man.get("model") or {}).get("name") or "unknown model"
    task = man.get("task") or {}
    data = ModelCardData(
        library_name="npeff_lens",
        base_model=HUB_MODELS.get(model, model),
        datasets=_dataset_names(man) or None,
        tags=TAGS + ([task["kind"]] if task.get("kind") else []),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(est, man, model, tunings, repo_id)}")


def _card_body(est, man: dict, model: str, tunings: dict | None, repo_id: str | None) -> str:
    C = int(est.coefficients_.shape[1])
    m = int(est.coefficients_.shape[0])
    dead = len(getattr(est, "dead_components_", []))
    task, proj, cfg = man.get("task") or {}, man.get("projection"), man.get("config") or {}
    layout = man.get("layout") or []
    params = ", ".join(f"`{p}`" for p in (cfg.get("params") or [])) or "the default selection (no embeddings, norms)"
    n_params = man.get("n_params") or sum(e.get("numel", 0) for e in layout)
    space = (
        f"sparse random projection (App. A) to d = {proj['n_out']} "
        f"(density {proj.get('density')}, seed {proj.get('seed')})"
        if proj
        else f"none: the components live in the full {n_params}-parameter space"
    )
    outcomes = ", ".join(f"`{o}`" for o in (man.get("outcomes") or [])) or "–"
    rows = [
        ("model", f"`{model}` (backend {(man.get('model') or {}).get('backend', '?')})"),
        ("task", f"{task.get('kind', '?')}; template `{task.get('template', '?')!r}`; outcomes {outcomes}"),
        ("parameters", f"{params}: {n_params:,} parameters in {len(layout)} tensors"),
        ("projection", space),
        ("PEF rows per example", str(man.get("pef_rows", getattr(est, "n_rows_", "?")))),
        ("examples", f"{m:,}" + "".join(f" of `{d}`" for d in _dataset_names(man))),
        ("components", f"{C} ({C - dead} alive)"),
        ("reconstruction loss", f"{getattr(est, 'reconstruction_err_', float('nan')):.4g} after {est.n_iter_} steps"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if tunings:
        tuned = (
            f"- tuned to a label: {tunings.get('label', float('nan')):.0%} of the components\n"
            f"- tuned to a prediction: {tunings.get('prediction', float('nan')):.0%}\n"
            f"- tuned to either: {tunings.get('either', float('nan')):.0%}\n\n"
            f"(a component is tuned when at least 95% of its top {tunings.get('k', 16)} examples share it, §3.1)"
        )
    else:
        tuned = "Not computed here: the PEF store with the examples' labels was not available when this was saved."
    where = repo_id or "path/to/this/folder"
    return f"""# NPEFF decomposition of `{model}`

{C} components of a Non-Negative Per-Example Fisher Factorization (NPEFF; Matena & Raffel) of `{model}`:
each example's Fisher information F(x) = G(x)ᵀG(x) (its LRM-PEF) is approximated by Σ_j W_xj h_j h_jᵀ with
non-negative coefficients W and pseudo-Fisher vectors h_j. A component is a *processing strategy*: the
examples with large coefficients are those whose predictions depend on the parameters along h_j.

## What was decomposed

| | |
|---|---|
{table}

## Headline tunings

{tuned}

## How to load

```python
from npeff_lens.hub import from_pretrained

npeff = from_pretrained("{where}")
npeff.components_     # [{C}, d] pseudo-Fisher vectors h_j (unit norm)
npeff.coefficients_   # [{m}, {C}] coefficients of the training examples
npeff.manifest_       # model, task, parameter layout, projection (seed, d, density)
```

`npeff.transform(store)` fits coefficients for new PEFs (a `npeff collect` store of the same model, task and
projection). `npeff report` builds the component dashboard; `npeff perturb` recovers h_j in parameter space
and perturbs the model along it (§3.3).

## Files

- `config.json`, `npeff.safetensors`: the estimator (`NPEFF.save`; `NPEFF.load` reads them)
- `{RUN_CONFIGS}`: the configs of the steps that produced it
"""


def save_pretrained(
    npeff_or_dir,
    out_dir,
    *,
    store_manifest: dict | None = None,
    run_configs: dict | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write a Hub-ready folder (module docstring) for an NPEFF or a decomposition / run directory.

    ``store_manifest``: the PEF store's manifest, when the NPEFF lacks one (its ``manifest_`` otherwise);
    ``run_configs``: ``{step: config}`` to record (a directory's run.json and store manifest are found
    anyway); ``repo_id``: named in the card's loading snippet. Returns ``out_dir``.
    """
    from .decomposition import NPEFF

    if isinstance(npeff_or_dir, NPEFF):
        est, directory = npeff_or_dir, None
    else:
        directory = _decomposition_dir(Path(npeff_or_dir))
        est = NPEFF.load(directory)
    out = Path(out_dir)
    if directory is not None and out.resolve() == directory.resolve():
        raise ValueError(f"out_dir {out} is the decomposition itself: choose another folder")
    configs = {**(_run_configs(directory) if directory is not None else {}), **(run_configs or {})}
    manifest = store_manifest if store_manifest is not None else (est.manifest_ or {})
    if store_manifest is not None and not est.manifest_:
        est.manifest_ = store_manifest
    est.save(out)
    write_json(out / RUN_CONFIGS, configs)
    model_card(est, manifest, tunings=_tunings(directory), repo_id=repo_id).save(out / "README.md")
    return out


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def from_pretrained(dir_or_repo_id, **download_kwargs):
    """An NPEFF from a local folder (any :func:`load_decomposition` accepts) or a Hub repo id
    (``huggingface_hub.snapshot_download``; ``download_kwargs``: ``revision``, ``token``, ``cache_dir``...)."""
    path = Path(os.fspath(dir_or_repo_id)).expanduser()
    if path.exists():
        return load_decomposition(path)
    name = os.fspath(dir_or_repo_id)
    if not _is_repo_id(name):
        raise FileNotFoundError(f"{name!r} is neither a local directory nor a Hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.md"], **download_kwargs)
    except Exception as e:  # the hub client raises many types (offline, 404, auth): one line for all
        raise HubError(f"could not download {name!r} from the Hugging Face Hub ({_one_line(e)})") from None
    return load_decomposition(local)


def push_to_hub(
    out_dir_or_npeff,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload NPEFF decomposition",
    **kwargs,
) -> str:
    """Upload a ``save_pretrained`` folder (an NPEFF or a decomposition directory is saved first, into a
    temporary folder) to the Hub model repo ``repo_id`` (created if needed). Returns the commit URL.
    ``kwargs`` go to ``HfApi.upload_folder`` (``revision``, ``create_pr``, ...)."""
    from .decomposition import NPEFF

    with tempfile.TemporaryDirectory(prefix="npeff_hub_") as tmp:
        folder = out_dir_or_npeff
        if isinstance(out_dir_or_npeff, NPEFF) or not (Path(out_dir_or_npeff) / "README.md").is_file():
            folder = save_pretrained(out_dir_or_npeff, Path(tmp) / "folder", repo_id=repo_id)
        try:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            info = api.upload_folder(
                folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message, **kwargs
            )
        except Exception as e:  # offline, auth, network: one line
            raise HubError(f"could not push to the Hugging Face Hub repo {repo_id!r} ({_one_line(e)})") from None
    return str(getattr(info, "commit_url", info))
