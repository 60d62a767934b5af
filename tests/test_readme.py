"""The README's command blocks run as written, in README order, in one temporary directory.

Every fenced ``bash`` and ``python`` block of README.md is extracted. A bash block runs each command line
(continuation lines joined, ``# comments`` dropped): ``npeff ...`` in this process through
``npeff_lens.cli.main``, ``torchrun ...`` as a subprocess of the virtualenv's ``torchrun`` (two gloo ranks); a
``|`` between two ``npeff`` commands is the README's way of listing alternatives, and each runs on its own. A python
block is exec'd. Blocks run in README order because later ones read what earlier ones wrote.

Sizes are shrunk by the substitutions in ``SUBSTITUTIONS`` (old text, new text, why), applied to the text of the
blocks, so that the whole file runs in a few minutes on a 2-core CPU. Each substitution must match somewhere: a
command edited in the README fails here instead of silently running at full size, or not at all. Commands that
are not run are listed in ``NOT_RUN`` with the reason, and checked another way."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"
BIN = Path(sys.executable).parent  # the virtualenv's scripts: torchrun

# One layer's attention weights (0.9M parameters) instead of the README's selections: collection costs about
# 0.1 s per example instead of 9.5 s (all 106M default parameters at density 32).
SMALL_PARAMS = "model.layers.29.self_attn.*"
# The same small sizes wherever a README block runs the same subcommand on runs/movie, so that a later block
# (on runs/demo, which stands for runs/movie here) resumes the earlier block's results instead of recomputing them.
COMPARE = "--components 4 --k 4 --sae-tokens 2048 --snmf-iterations 10 --snmf-restarts 1 --snmf-tokens 2048"
SELECTIVITY = "--n-baseline 4 --selectivity-components 1"
UNLEARN = "--n-batches 2 --k-eval 2 --k-mitigation 2 --n-random 4 --retain-batch-size 4"
ICL = "--k 4 --n-eval 8 --shots 2 --n-prompts 2 --n-select 8"

# (old, new, why), applied in this order to the text of every fenced block; each old text must match.
SUBSTITUTIONS = [
    # Working code first (python)
    ("n=640", "n=24", "24 examples instead of 640"),
    ('"model.layers.2[0-9].self_attn.*"', f'"{SMALL_PARAMS}"', "one layer's attention instead of ten layers'"),
    ("n_components=16", "n_components=4", "4 components of 24 examples"),
    # Command line; the torchrun collection gets the same parameter selection
    (
        '--labels " negative" " positive"',
        f'--labels " negative" " positive" --params \'{SMALL_PARAMS}\'',
        "one layer's attention instead of all default parameters",
    ),
    ("--n 200 ", "--n 16 ", "16 examples instead of 200"),
    ("--components 32 ", "--components 4 --steps 200 ", "4 components in 200 steps"),
    (
        "--components 16 --magnitude 6 ",
        "--components 1 --magnitude 6 --top-k 4 --n-baseline 4 ",
        "1 component, 4 top and 4 baseline examples",
    ),
    (
        "npeff compare runs/movie/npeff --selectivity",
        f"npeff compare runs/movie/npeff --selectivity {COMPARE} {SELECTIVITY}",
        "4 clusters, latents and features on 4 top examples; short SAE and SNMF fits; selectivity of each "
        "method's first component on 4 baseline examples",
    ),
    ("npeff unlearn runs/movie/npeff ", f"npeff unlearn runs/movie/npeff {UNLEARN} ", "2 unlearning batches"),
    ("npeff icl runs/movie/npeff ", f"npeff icl runs/movie/npeff {ICL} ", "8 held-out examples, 2 prompts of 2 shots"),
    ("--n 16 --out runs/trace", "--n 1 --samples 2 --out runs/trace", "one fact, two noise draws"),
    # Multi-process collection
    ("--nproc-per-node 4 ", "--nproc-per-node 2 ", "2 ranks on the 2-core machine"),
    ("--n 2000 ", "--n 16 ", "16 examples instead of 2000"),
    # The blocks on the demo's run: the same sizes as the command-line block's, so that they resume its results
    ("--components 16 --sae-hook", f"{COMPARE} --sae-hook", "as the command-line block's compare"),
    (
        "--selectivity --target-kl 0.01 --n-baseline 32",
        f"--selectivity {COMPARE} --target-kl 0.01 {SELECTIVITY}",
        "as the command-line block's compare --selectivity",
    ),
    ("--n-batches 75 ", f"{UNLEARN} ", "as the command-line block's unlearn"),
    ("--n-eval 200 --shots 6 --n-prompts 50 ", f"{ICL} ", "as the command-line block's icl"),
    (
        "runs/demo/",
        "runs/movie/",
        "`make demo` is not run (see NOT_RUN): the command-line block's run, built above, stands for its run directory",
    ),
]

# Commands that are not run, by name, with the reason; test_not_run_commands_are_makefile_targets checks them.
NOT_RUN = {
    "make demo": "sets up the virtualenv and runs the demo at full size (minutes); the blocks that read its "
    "runs/demo read the command-line block's runs/movie instead",
    "make test": "runs the whole test suite, this test included",
}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence
    lang: str
    name: str  # the test id: language and heading, numbered when one heading holds several blocks
    text: str


def readme_blocks() -> list[Block]:
    """The fenced bash and python blocks of README.md, in order, each named by the heading it sits under."""
    blocks, heading, fence, seen = [], "", None, {}
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if fence is None:
            if line.startswith("#"):
                heading = re.sub(r"[^a-z0-9]+", "-", line.lower()).strip("-")
            elif line.startswith("```"):
                fence = (number, line[3:].strip(), [])
        elif line.startswith("```"):
            number, lang, lines = fence
            if lang in ("bash", "python"):
                name = f"{lang}-{heading}"
                seen[name] = seen.get(name, 0) + 1
                name += f"-{seen[name]}" if seen[name] > 1 else ""
                blocks.append(Block(number, lang, name, "\n".join(lines) + "\n"))
            fence = None
        else:
            fence[2].append(line)
    return blocks


def substituted(blocks: list[Block]) -> tuple[list[Block], dict[str, int]]:
    """The blocks with every substitution applied, and how often each old text matched."""
    counts = {old: 0 for old, _, _ in SUBSTITUTIONS}
    result = []
    for block in blocks:
        text = block.text
        for old, new, _ in SUBSTITUTIONS:
            counts[old] += text.count(old)
            text = text.replace(old, new)
        result.append(Block(block.line, block.lang, block.name, text))
    return result, counts


def command_lines(text: str) -> list[str]:
    """A bash block's command lines: continuation lines joined; blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def alternatives(line: str) -> list[list[str]]:
    """A command line's words, split at ``|`` between npeff commands (the README's notation for "or")."""
    words = shlex.split(line, comments=True)
    parts, current = [], []
    for word in words:
        if word == "|":
            parts.append(current)
            current = []
        else:
            current.append(word)
    parts.append(current)
    if len(parts) > 1:
        assert all(p and p[0] == "npeff" for p in parts), f"a pipe that is not a list of npeff commands: {line}"
    return parts


def makefile_targets() -> dict[str, list[str]]:
    """Each Makefile target with its recipe lines."""
    targets, current = {}, None
    for line in MAKEFILE.read_text().splitlines():
        match = re.match(r"^([A-Za-z][\w.-]*)\s*:(?![=:])", line)
        if match:
            current = targets.setdefault(match.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
        elif line.strip() and not line.startswith("#"):
            current = None
    return targets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_npeff(argv: list[str]) -> None:
    from npeff_lens.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # --help
        rc = e.code or 0
    assert rc == 0, f"npeff {shlex.join(argv)} exited with {rc}"


def run_torchrun(argv: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PET_MASTER_PORT=str(_free_port()))  # torchrun reads PET_<FLAG>
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([str(BIN / "torchrun"), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun {shlex.join(argv)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("PEFStore(") == 1, proc.stdout  # rank 0 reports the one store


RUNNERS = {
    "npeff": lambda words, cwd: run_npeff(words[1:]),
    "torchrun": lambda words, cwd: run_torchrun(words[1:], cwd),
}


def run_command(words: list[str], cwd: Path) -> None:
    line = shlex.join(words)
    if line in NOT_RUN:
        return
    assert words[0] in RUNNERS, f"no runner for this README command: {line}"
    start = time.perf_counter()
    RUNNERS[words[0]](words, cwd)
    print(f"[readme] {time.perf_counter() - start:6.1f}s  {line}")


BLOCKS, MATCHES = substituted(readme_blocks())


def test_the_readme_has_bash_and_python_blocks():
    langs = [b.lang for b in BLOCKS]
    assert "bash" in langs and "python" in langs
    assert all(command_lines(b.text) for b in BLOCKS if b.lang == "bash")


@pytest.mark.parametrize("old, why", [(old, why) for old, _, why in SUBSTITUTIONS], ids=[s[0] for s in SUBSTITUTIONS])
def test_every_substitution_matches_the_readme(old, why):
    assert MATCHES[old] > 0, f"{old!r} ({why}) is no longer in any README block: update SUBSTITUTIONS in {__file__}"


def readme_commands() -> list[list[str]]:
    """Every command of every bash block (after the substitutions), in README order."""
    return [words for b in BLOCKS if b.lang == "bash" for line in command_lines(b.text) for words in alternatives(line)]


def test_every_readme_command_has_a_runner():
    for words in readme_commands():
        line = shlex.join(words)
        assert line in NOT_RUN or words[0] in RUNNERS, f"no runner for this README command (nor in NOT_RUN): {line}"


def test_not_run_commands_are_makefile_targets():
    lines = {shlex.join(words) for words in readme_commands()}
    assert set(NOT_RUN) <= lines, f"listed as not run but not in the README: {set(NOT_RUN) - lines}"
    targets = makefile_targets()
    for command in NOT_RUN:
        assert command.split()[0] == "make" and command.split()[1] in targets, f"{command}: no such Makefile target"


def run_block(block: Block, cwd: Path) -> None:
    if block.lang == "python":
        start = time.perf_counter()
        exec(compile(block.text, f"{README}:{block.line}", "exec"), {"__name__": "__main__"})
        print(f"[readme] {time.perf_counter() - start:6.1f}s  the python block at README.md:{block.line}")
        return
    for line in command_lines(block.text):
        for words in alternatives(line):
            run_command(words, cwd)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """One working directory for all blocks, and each block's outcome (True: ran; False: failed)."""
    return tmp_path_factory.mktemp("readme"), {}


@pytest.mark.real_model
@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, marks=[pytest.mark.distributed] if "torchrun" in b.text else [], id=b.name)
        for i, b in enumerate(BLOCKS)
    ],
)
def test_readme_block_runs(index, readme_run, monkeypatch):
    """Blocks run in README order, all in one directory: a block may read what an earlier one wrote. A block
    selected on its own (``-k``) runs the blocks before it first."""
    workdir, outcome = readme_run
    monkeypatch.chdir(workdir)
    for i in range(index + 1):
        if i in outcome:
            continue
        if not all(outcome.values()):
            pytest.skip(f"an earlier README block failed: {[BLOCKS[j].name for j, ok in outcome.items() if not ok]}")
        outcome[i] = False
        run_block(BLOCKS[i], workdir)
        outcome[i] = True
