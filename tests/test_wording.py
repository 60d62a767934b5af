"""The repository's files describe the project, not how it was built: no tracked text file speaks of tracker
numbers, the phases and items of a work plan, who or what did the work, or a machine borrowed for a while.

Each pattern matches the prose use of a word (comments, docstrings, Markdown) and leaves its legitimate uses
alone: ``requests.Session``, an HTTP session, pytest's ``scope="session"``, identifiers such as ``session_id``."""

import re
import subprocess

import pytest
from helpers import ROOT

# (pattern, why it is refused); matched case-insensitively, line by line.
PATTERNS = [
    (r"\bissues? #?\d+", "a tracker issue number: the project's files say what the code does, not which ticket asked"),
    (r"\bdeliver(?:able)s?\b", "an item of a work plan, not of the project"),
    (r"\bthis\s+task\b", "the work that produced a file, not what the file is"),
    # the word in prose; not a class or a call (`requests.Session`, `Session(`), pytest's fixture scope, an
    # identifier (`..._id`), nor an HTTP one
    (r"(?<![\w.\"'])(?<!HTTP )sess(?:ion)\b(?![\w(\"])", "a period of work of whoever built the project"),
    (r"\bhelper\s+agents?\b", "who built the project, not what it is"),
    (r"\bsub-?agents?\b", "who built the project, not what it is"),
    (r"\blent\b", "a borrowed machine: say what any GPU host needs instead"),
    (r"\bthe\s+GPU\s+machine\b", "one particular borrowed host: say what any GPU host needs instead"),
    (r"\bremote\s+(machine|runner)s?\b", "one particular borrowed host: say what any GPU host needs instead"),
    (r"\bwave\s+\d", "a phase of the work plan"),
    (r"\bworking\s+period", "a phase of the work plan"),
]
COMPILED = [(re.compile(p, re.IGNORECASE), why) for p, why in PATTERNS]


def _tracked_text_files():
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in out.split("\0"):
        if not name:
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


# Each planted sentence is given in pieces, joined when the test runs, so that this file does not itself
# contain the phrases it refuses.
PLANTED = [
    ("Fixed in", "issue", "#12."),
    ("The", "deliver" + "ables are listed below."),
    ("In this", "task we rewrite it."),
    ("Measured in the last", "sess" + "ion."),
    ("A helper", "agent ran it."),
    ("The GPU", "machine was", "le" + "nt for an hour."),
    ("on the remote", "runner"),
    ("Done in wave", "2."),
    ("during the working", "period"),
]


@pytest.mark.parametrize("words", PLANTED, ids=lambda words: words[0])
def test_each_pattern_catches_what_it_is_for(words):
    text = " ".join(words)
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
