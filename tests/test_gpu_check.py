"""benchmarks/gpu.py, the one-shot GPU check: its --smoke run takes every code path at tiny sizes on CPU, so the
script keeps working between GPU runs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT, load_script

SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _script():
    return load_script("benchmarks/gpu.py")


def _sections(text: str) -> dict[str, list[str]]:
    """Lines under each '## ' header."""
    out, current = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def _rows(lines: list[str]) -> list[str]:
    """Table body rows: '| ... |' lines that are neither a header nor its separator."""
    sep = re.compile(r"^\|[-:|]+\|$")
    return [
        l for l, nxt in zip(lines, lines[1:] + [""]) if l.startswith("| ") and l.endswith(" |") and not sep.match(nxt)
    ]


def test_smoke_run_prints_every_section(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    out = tmp_path / "check.md"
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = p.stdout
    mod = _script()
    sections = _sections(text)
    for name in mod.SECTIONS:
        title = mod.TITLES[name]
        assert title in sections, f"no '## {title}' in:\n{text}"
        assert _rows(sections[title]), f"no table row under '## {title}':\n{text}"
        assert "raised" not in "\n".join(sections[title])
    # the device line (first table row) says CPU; every section ran and was ok
    head = text.split("\n## ", 1)[0]
    assert _rows(head.splitlines())[0].startswith("| CPU"), head
    run = "\n".join(_rows(sections["Run"]))
    for name in mod.SECTIONS:
        assert re.search(rf"^\| {name} \| [\d.]+ \| ok \|$", run, re.M), run
    assert "| none |" in run  # nothing a torch + triton host lacks was imported
    # the parity subprocess ran tests and they passed; the decomposition took the extrapolation path
    parity = _rows(sections[mod.TITLES["parity"]])[0].split("|")
    assert int(parity[2]) > 0 and int(parity[3]) == 0 and int(parity[4]) == 0
    assert "extrapolated" in "\n".join(sections[mod.TITLES["decomposition"]])
    assert out.read_text() == text


def test_smollm2_literal_matches_the_cached_checkpoint():
    """The configuration written into the script is SmolLM2-135M's (checked against the converted checkpoint's
    config.json when `make setup` has made one)."""
    from npeff_lens.assets import cache_dir

    literal = _script().SMOLLM2_135M
    assert (literal["num_hidden_layers"], literal["hidden_size"], literal["vocab_size"]) == (30, 576, 49152)
    assert (literal["num_attention_heads"], literal["num_key_value_heads"], literal["tie_word_embeddings"]) == (
        9,
        3,
        True,
    )
    path = cache_dir() / "models" / "smollm2-135m" / "config.json"
    if not path.exists():
        pytest.skip(f"no converted SmolLM2 checkpoint at {path}")
    cached = json.loads(path.read_text())
    for key, value in literal.items():
        if isinstance(value, float):  # the GGUF stores rms_norm_eps in float32
            assert math.isclose(cached[key], value, rel_tol=1e-6), key
        else:
            assert cached[key] == value, key
