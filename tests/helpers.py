"""Test data shared by the test modules: the tiny review vocabulary, the texts drawn from it, the review task's
template and labels, a per-module cache of tiny models, and the repository's scripts as modules. Fixtures built
on these live in ``conftest.py``.

A plain module because test modules call these at import time and from their own helpers. ``tests/`` has no
``__init__.py``, so pytest's default import mode (``prepend``) puts it on ``sys.path``: ``from helpers import``."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import random
import shlex
import warnings
from pathlib import Path

WORDS = tuple("great dull moving boring fun sad happy awful wonderful terrible brilliant good bad film movie".split())
WORDS_AND_ARTICLES = (*WORDS, "the", "a")
TEMPLATE = "Review: {text} Sentiment:"
LABELS = (" bad", " sad")  # one token each in the tiny tokenizer


ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """A script of the repository (``benchmarks/NAME.py``, ``tools/NAME.py``) as a module, by its path."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"_npeff_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_texts(n: int, seed: int, max_words: int, words=WORDS) -> list[str]:
    """``n`` texts of 2 to ``max_words`` words of ``words``, drawn by ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, max_words))) for _ in range(n)]


def reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (text, sentiment) rows: 2 to 6 words of ``WORDS`` and 'sad' or 'bad', from one generator."""
    rng = random.Random(seed)
    return [
        (" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))), rng.choice(["sad", "bad"])) for _ in range(n)
    ]


def write_reviews_csv(path: Path, n: int, seed: int = 0) -> Path:
    """``reviews(n, seed)`` as a CSV file with columns ``review`` and ``sentiment``."""
    path.write_text("review,sentiment\n" + "\n".join(f"{t},{s}" for t, s in reviews(n, seed)) + "\n")
    return path


def reviews_collect_argv(dataset, out, *extra: str, labels=LABELS, proj_dim: int = 256) -> list[str]:
    """`npeff collect` of tiny-llama on a ``write_reviews_csv`` file into ``out`` (float32 PEFs), then ``extra``."""
    task = shlex.split("--text-column review --label-column sentiment --template 'Review: {text} Sentiment:'")
    argv = ["collect", "--model", "tiny-llama", "--dataset", str(dataset), *task, "--labels", *labels]
    return [*argv, "--proj-dim", str(proj_dim), "--dtype", "float32", "--out", str(out), "--no-progress", *extra]


def decompose_argv(store, out, *extra: str) -> list[str]:
    """`npeff decompose` of ``store`` into ``out``: 3 components, 40 steps of which 10 warm up, then ``extra``."""
    argv = shlex.split("decompose --components 3 --steps 40 --warmup-steps 10")
    return [*argv, "--store", str(store), "--out", str(out), "--no-progress", *extra]


def model_cache(quiet: bool = True):
    """``load(arch, backend="hf")``: ``load_model`` once per (arch, backend) for the module that calls this (each
    module its own cache, so that one that changes a model cannot reach another); ``quiet`` silences load warnings."""
    from npeff_lens.models import load_model

    @functools.cache
    def load(arch: str, backend: str = "hf"):
        if not quiet:
            return load_model(arch, backend=backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_model(arch, backend=backend)

    return load


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HAS_CHROMIUM = os.path.exists(CHROMIUM)


@contextlib.contextmanager
def offline_page(width: int = 1280, height: int = 900):
    """``(page, requests, errors)``: a headless Chromium page (playwright) that may load ``file:`` URLs only (every
    other request aborted), with every request URL and every console or page error collected."""
    import pytest

    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    requests, errors = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": width, "height": height})
        context.route(
            "**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort()
        )
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            yield page, requests, errors
        finally:
            browser.close()


def saved_without(directory: Path, json_name: str, tensors_name: str, *, param: str, tensor: str) -> None:
    """Rewrite an estimator saved in ``directory`` as an earlier version wrote it: its ``json_name`` without the
    parameter ``param``, its ``tensors_name`` (safetensors) without ``tensor``."""
    import json

    from safetensors.torch import load_file, save_file

    meta = json.loads((directory / json_name).read_text())
    del meta["params"][param]
    (directory / json_name).write_text(json.dumps(meta))
    tensors = load_file(directory / tensors_name)
    del tensors[tensor]
    save_file(tensors, directory / tensors_name)
