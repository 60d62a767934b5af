"""The repository's files describe the project, not how it was built: no tracked text file speaks of issues,
deliverables, sessions, helper agents, lent machines, waves or working periods.

Each pattern matches the prose use of a word (comments, docstrings, Markdown) and leaves its legitimate uses
alone: ``requests.Session``, an HTTP session, pytest's ``scope="session"``, identifiers such as ``session_id``."""

import re
import subprocess

import pytest
from helpers import ROOT

# (pattern, why it is refused); matched case-insensitively, line by line.
PATTERNS = [
    (r"\bissues? #?\d+", "a tracker issue number: the project's files say what the code does, not which ticket asked"),
    (r"\bdeliverables?\b", "a word of the work plan, not of the project"),
    (r"\bthis task\b", "the work that produced a file, not what the file is"),
    # a session in prose; not `requests.Session`, `scope="session"`, `session_id`, `Session(`, nor an HTTP session
    (r"(?<![\w.\"'])(?<!HTTP )session\b(?![\w(\"])", "a working session of whoever built the project"),
    (r"\bhelper agents?\b", "who built the project, not what it is"),
    (r"\bsub-?agents?\b", "who built the project, not what it is"),
    (r"\blent\b", "a machine lent for a while: say what any GPU host needs instead"),
    (r"\bthe GPU machine\b", "one particular remote machine: say what any GPU host needs instead"),
    (r"\bremote (machine|runner)s?\b", "one particular remote machine: say what any GPU host needs instead"),
    (r"\bwave \d", "a phase of the work plan"),
    (r"\bworking period", "a phase of the work plan"),
]
COMPILED = [(re.compile(p, re.IGNORECASE), why) for p, why in PATTERNS]
SELF = "tests/test_wording.py"


def _tracked_text_files():
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in out.split("\0"):
        if not name or name == SELF:
            continue
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        try:
            yield name, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def hits(text: str) -> list[tuple[int, str, str]]:
    """(line number, matched text, pattern) of every refused phrase in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for rx, _ in COMPILED:
            found += [(number, m.group(0), rx.pattern) for m in rx.finditer(line)]
    return found


@pytest.mark.parametrize(
    "text",
    [
        "Fixed in issue #12.",
        "The deliverables are listed below.",
        "In this task we rewrite it.",
        "Measured in the last session.",
        "A helper agent ran it.",
        "The GPU machine was lent for an hour.",
        "on the remote runner",
        "Done in wave 2.",
        "during the working period",
    ],
)
def test_each_pattern_catches_what_it_is_for(text):
    assert hits(text), text


@pytest.mark.parametrize(
    "text",
    [
        "s = requests.Session()",
        '@pytest.fixture(scope="session")',
        "session_id = 3",
        "an HTTP session with the Hub",
        "tissue 3",
        "requests.Session(), Session(",
        "relentless",
        "a microwave 3",
    ],
)
def test_legitimate_uses_pass(text):
    assert not hits(text), hits(text)


def test_no_tracked_file_describes_how_the_project_was_built():
    bad = [
        f"{name}:{number}: {match!r} ({pattern})"
        for name, text in _tracked_text_files()
        for number, match, pattern in hits(text)
    ]
    assert not bad, "\n".join(bad)
