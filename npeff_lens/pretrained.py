"""The pretrained-folder format of a fitted decomposition: what the Hugging Face Hub understands.

A folder holds ``config.json`` + ``npeff.safetensors`` (exactly :meth:`NPEFF.save`'s format, so ``NPEFF.load``
reads it too), ``run_configs.json`` (the configs of the steps that made it) and a model card ``README.md`` whose
metadata says ``library_name: npeff_lens``, the ``base_model``, the ``datasets`` and ``tags``, and whose body
says what was decomposed (model, task, parameters, projection d, examples, components), the headline tunings
(§3.1) and how to load it. Hub access goes through ``huggingface_hub``; without a network
(``HF_HUB_OFFLINE=1``) a repo id is a one-line error and local folders keep working.

This module works on an estimator and folders alone; :mod:`npeff_lens.hub` adds run directories (their
configs and tunings). The estimator's class is passed in, so the estimator can call here without a cycle.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .io import read_json, write_json

__all__ = [
    "HubError",
    "RUN_CONFIGS",
    "decomposition_dir",
    "load_folder",
    "model_card",
    "write_folder",
    "from_pretrained",
    "upload_folder",
    "push_estimator",
]

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


def load_folder(path, cls):
    """The ``cls`` estimator in ``path``: a decomposition directory (``npeff decompose``), a pretrained folder, or
    a run directory holding one decomposition (``npeff/``, else the one subdirectory whose run.json says
    ``decompose``)."""
    return cls.load(decomposition_dir(Path(path)))


def decomposition_dir(path: Path) -> Path:
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


def write_folder(
    est,
    out_dir,
    *,
    store_manifest: dict | None = None,
    run_configs: dict | None = None,
    tunings: dict | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the pretrained folder of the fitted estimator ``est`` (module docstring); returns ``out_dir``.

    ``store_manifest``: the PEF store's manifest, when the estimator lacks one (its ``manifest_`` otherwise);
    ``run_configs``: ``{step: config}`` to record; ``tunings``: the headline tunings for the card;
    ``repo_id``: named in the card's loading snippet."""
    out = Path(out_dir)
    manifest = store_manifest if store_manifest is not None else (est.manifest_ or {})
    if store_manifest is not None and not est.manifest_:
        est.manifest_ = store_manifest
    est.save(out)
    write_json(out / RUN_CONFIGS, run_configs or {})
    model_card(est, manifest, tunings=tunings, repo_id=repo_id).save(out / "README.md")
    return out


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def from_pretrained(dir_or_repo_id, cls, **download_kwargs):
    """A ``cls`` estimator from a local folder (any :func:`load_folder` accepts) or a Hub repo id
    (``huggingface_hub.snapshot_download``; ``download_kwargs``: ``revision``, ``token``, ``cache_dir``...)."""
    path = Path(os.fspath(dir_or_repo_id)).expanduser()
    if path.exists():
        return load_folder(path, cls)
    name = os.fspath(dir_or_repo_id)
    if not _is_repo_id(name):
        raise FileNotFoundError(f"{name!r} is neither a local directory nor a Hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.md"], **download_kwargs)
    except Exception as e:  # the hub client raises many types (offline, 404, auth): one line for all
        raise HubError(f"could not download {name!r} from the Hugging Face Hub ({_one_line(e)})") from None
    return load_folder(local, cls)


def upload_folder(
    folder,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload NPEFF decomposition",
    **kwargs,
) -> str:
    """Upload a pretrained folder to the Hub model repo ``repo_id`` (created if needed); returns the commit URL.
    ``kwargs`` go to ``HfApi.upload_folder`` (``revision``, ``create_pr``, ...)."""
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


def push_estimator(est, repo_id: str, **kwargs) -> str:
    """Save ``est`` as a pretrained folder (in a temporary folder) and upload it (:func:`upload_folder`)."""
    with tempfile.TemporaryDirectory(prefix="npeff_hub_") as tmp:
        folder = write_folder(est, Path(tmp) / "folder", repo_id=repo_id)
        return upload_folder(folder, repo_id, **kwargs)
