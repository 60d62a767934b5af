"""The documentation site, built as ``make docs`` builds it (the tutorial run into docs/tutorial.ipynb, then
``mkdocs build --strict``), and opened from disk in headless Chromium with every non-file request refused.

Also the griffe extension that turns the docstrings' reST habits into the site's Markdown
(tools/griffe_docstrings.py), on small planted docstrings."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from helpers import CHROMIUM, HAS_CHROMIUM, ROOT, load_script, offline_page

# the tutorial runs in the fixture: minutes on a CPU, more on a busy one
pytestmark = [pytest.mark.docs, pytest.mark.timeout(1800)]

TUTORIAL_SCRIPT = ROOT / "tools" / "run_tutorial.py"
TUTORIAL_SOURCE = ROOT / "docs" / "tutorial.py"
# the recipe of `make docs`, as the Makefile writes it; the fixture runs it with `--site-dir` in a temporary folder
MAKE_DOCS = ["$(PY) tools/run_tutorial.py", "$(PY) -m mkdocs build --strict --site-dir site"]
needs_chromium = pytest.mark.skipif(not HAS_CHROMIUM, reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")


def test_make_docs_runs_the_commands_this_module_builds_with():
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index("docs: setup") + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    assert recipe == MAKE_DOCS


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The built site's folder."""
    missing = [str(p.relative_to(ROOT)) for p in (TUTORIAL_SCRIPT, TUTORIAL_SOURCE) if not p.exists()]
    if missing:
        pytest.skip(f"the tutorial is not in the repository yet ({', '.join(missing)} missing)")
    out = tmp_path_factory.mktemp("site")
    for command in MAKE_DOCS:
        argv = [sys.executable if a == "$(PY)" else a for a in shlex.split(command)]
        argv = [str(out) if a == "site" and argv[i - 1] == "--site-dir" else a for i, a in enumerate(argv)]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{command} failed:\n{(done.stdout + done.stderr)[-6000:]}"
    return out


def _pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _pages(value)]
    return [p for item in nav for p in _pages(item)]


def test_the_site_builds_with_every_page_of_the_navigation(site):
    # --strict already failed the fixture on any warning; here: each page of the nav was written
    nav = _pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert {"index.md", "tutorial.ipynb", "reference/decomposition.md", "changelog.md"} <= set(nav)
    for page in nav:
        assert (site / Path(page).with_suffix(".html")).is_file(), page


def _assets_resolve(page) -> list[str]:
    """The img / stylesheet / script references of the open page that do not name an existing local file."""
    refs = page.evaluate(
        """() => [...document.querySelectorAll('img, link[rel~=stylesheet], script[src]')].map(e => [
              e.tagName, e.getAttribute(e.tagName === 'LINK' ? 'href' : 'src'), e.src || e.href || ''])"""
    )
    bad = []
    for tag, attr, url in refs:
        if tag == "SCRIPT" and attr == "":
            continue  # mkdocs-jupyter's MathJax tag without a URL: it requests nothing
        parts = urlsplit(url)
        if parts.scheme != "file" or not Path(unquote(parts.path)).is_file():
            bad.append(f"<{tag.lower()}> {attr!r} -> {url}")
    return bad


@needs_chromium
@pytest.mark.parametrize("name", ["index.html", "tutorial.html"])
def test_a_page_opens_from_disk_without_a_network(site, name):
    with offline_page() as (page, requests, errors):
        failed = []
        page.on("requestfailed", lambda r: failed.append(f"{r.url} ({r.failure})"))
        page.goto((site / name).as_uri())
        page.wait_for_load_state("networkidle")
        assert errors == [] and failed == []
        assert requests and [u for u in requests if not u.startswith("file:")] == []
        assert _assets_resolve(page) == []
        assert page.locator("article h1").count() == 1


@needs_chromium
def test_search_answers_from_disk(site):
    # material's search runs in a worker, which a file:// page may not start; the local polyfill runs it in an
    # iframe. A query typed before the index is ready is dropped, so type it again until results come.
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with offline_page() as (page, requests, errors):
        page.goto((site / "index.html").as_uri())
        page.locator("input[data-md-component=search-query]").click()
        results = page.locator(".md-search-result__item")
        for _ in range(10):
            page.keyboard.press("Control+A")
            page.keyboard.type("npeff", delay=20)
            try:
                results.first.wait_for(timeout=2000)
                break
            except PlaywrightTimeout:
                continue
        assert results.count() > 0, page.inner_text(".md-search-result__meta")
        assert errors == [] and all(u.startswith("file:") for u in requests)


@needs_chromium
def test_the_tutorial_page_shows_every_output_of_the_executed_notebook(site):
    notebook = json.loads((ROOT / "docs" / "tutorial.ipynb").read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code and all(c["execution_count"] is not None for c in code if c["source"]), "not executed"
    with_output = [c for c in code if c["outputs"]]
    assert with_output, "the tutorial prints nothing"
    with offline_page() as (page, _, errors):
        page.goto((site / "tutorial.html").as_uri())
        cell = ".jp-CodeCell:not(:has(.jp-CodeCell))"  # the innermost: mkdocs-jupyter wraps each cell in another
        cells = page.locator(cell)
        shown = page.locator(f"{cell}:has(.jp-OutputArea-output)")
        assert cells.count() == len(code)
        assert shown.count() == len(with_output)
        assert page.locator(".jp-OutputArea-output").first.inner_text().strip()
        assert errors == []


class _Text(HTMLParser):
    """The text of a page outside ``<code>`` and ``<pre>``, and the ``id`` of every element."""

    def __init__(self):
        super().__init__()
        self.depth, self.prose, self.ids = 0, [], set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(v for k, v in attrs if k == "id" and v)
        self.depth += tag in ("code", "pre")

    def handle_endtag(self, tag):
        self.depth -= tag in ("code", "pre")

    def handle_data(self, data):
        if not self.depth:
            self.prose.append(data)


def _parse(path: Path) -> _Text:
    parser = _Text()
    parser.feed(path.read_text())
    return parser


def _reference_modules() -> dict[str, str]:
    """Each module documented by the reference pages -> its page."""
    modules = {}
    for page in sorted((ROOT / "docs" / "reference").glob("*.md")):
        for module in re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.M):
            modules[module] = page.with_suffix(".html").name
    return modules


def test_the_reference_lists_npeff_on_the_decomposition_page(site):
    page = _parse(site / "reference" / "decomposition.html")
    assert "npeff_lens.decomposition.NPEFF" in page.ids
    assert "npeff_lens.decomposition.NPEFF.fit" in page.ids and "npeff_lens.nmf.npeff_factorization" in page.ids


def test_the_reference_documents_exactly_the_names_each_module_exports(site):
    import griffe

    package = griffe.load("npeff_lens", search_paths=[str(ROOT)], resolve_aliases=True, resolve_external=False)
    modules = _reference_modules()
    assert {"npeff_lens.decomposition", "npeff_lens.errors", "npeff_lens.applications.icl"} <= set(modules)
    for path, html in modules.items():
        module = package[path.removeprefix("npeff_lens.")] if path != "npeff_lens" else package
        ids = _parse(site / "reference" / html).ids
        # the names under the module's heading, less a package's modules documented on their own
        inner = tuple(m.removeprefix(path + ".") for m in modules if m.startswith(path + "."))
        shown = {i.removeprefix(path + ".") for i in ids if i.startswith(path + ".")}
        top = {n.split(".")[0] for n in shown if n not in inner and not n.startswith(tuple(m + "." for m in inner))}
        if module.exports is not None:
            documented = {n for n in module.exports if module[n].docstring is not None}
            assert documented <= top, (path, sorted(documented - top))
            assert top <= set(module.exports), (path, sorted(top - set(module.exports)))
        else:
            assert not any(name.startswith("_") for name in top), (path, sorted(top))


def test_no_reference_page_shows_rest_roles_or_bare_doctest_lines(site):
    for page in sorted((site / "reference").glob("*.html")):
        prose = "".join(_parse(page).prose)
        assert not re.search(r":(func|class|meth|mod|data|attr):`", prose), page.name
        assert ">>>" not in prose, page.name


def test_roles_link_to_where_the_reference_documents_their_target(site):
    html = (site / "reference" / "decomposition.html").read_text()
    # nmf's module docstring names :class:`~npeff_lens.decomposition.NPEFF`: a link on the same page, titled NPEFF
    assert re.search(r'<a [^>]*href="#npeff_lens\.decomposition\.NPEFF"[^>]*><code>NPEFF</code></a>', html)
    # and a name on another page links there
    assert 'href="collection.html#npeff_lens.store.PEFStore"' in html


# -- the griffe extension, on planted docstrings ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ext():
    return load_script("tools/griffe_docstrings.py")


PLANTED = {
    "__init__.py": '"""The package: :mod:`.sub` and :func:`~planted.sub.thing`."""',
    "sub.py": '''"""A module."""
from .other import Helper


def thing():
    """Uses :class:`Helper`, :func:`local`, :meth:`Helper.go` and :func:`missing_name`."""


def local():
    """Local."""
''',
    "other.py": '''"""Other: :mod:`.sub` relative to the package."""


class Helper:
    """Helps."""

    def go(self):
        """Goes; see :meth:`go` and :class:`the thing <planted.sub.thing>`."""
''',
}


def _ref(identifier: str, title: str) -> str:
    return f'<autoref identifier="{identifier}" optional>`{title}`</autoref>'


def test_roles_resolve_from_the_docstring_scope(ext):
    import griffe

    with griffe.temporary_visited_package("planted", PLANTED) as pkg:
        got = ext.roles_to_refs(pkg.docstring.value, pkg)
        assert _ref("planted.sub", "sub") in got and _ref("planted.sub.thing", "thing") in got
        thing = pkg["sub.thing"]
        got = ext.roles_to_refs(thing.docstring.value, thing)
        assert _ref("planted.other.Helper", "Helper") in got  # through sub's import, to where it is defined
        assert _ref("planted.sub.local", "local") in got
        assert _ref("planted.other.Helper.go", "Helper.go") in got
        assert _ref("missing_name", "missing_name") in got  # unresolved: optional, so it renders as code
        go = pkg["other.Helper.go"]
        got = ext.roles_to_refs(go.docstring.value, go)
        assert _ref("planted.other.Helper.go", "go") in got and _ref("planted.sub.thing", "the thing") in got
        other = pkg["other"]
        assert _ref("planted.sub", "sub") in ext.roles_to_refs(other.docstring.value, other)


DOCTEST = """Summary.

Example:
    >>> x = f()
    >>> x["a"][:5]
    [1, 2]

Free text after.

Layout::

    >>> not a doctest: inside a literal block
    report/index.html

Indented but not a section:

    >>> y = 1"""


def test_doctests_become_code_blocks_in_and_out_of_sections(ext):
    in_sections = ext.fence_doctests(DOCTEST, sections=True)
    # under a Google title the block keeps its indent and follows the title at once (griffe dedents it)
    assert 'Example:\n    ```pycon\n    >>> x = f()\n    >>> x["a"][:5]\n    [1, 2]\n    ```\n\nFree' in in_sections
    assert "Layout:\n\n    >>> not a doctest" in in_sections  # reST "::" reads ":", its block is already code
    assert "Indented but not a section:\n\n```pycon\n>>> y = 1\n```" in in_sections
    plain = ext.fence_doctests(DOCTEST, sections=False)
    assert 'Example:\n\n```pycon\n>>> x = f()\n>>> x["a"][:5]\n[1, 2]\n```\n\nFree' in plain
    assert ext.fence_doctests("```\n>>> kept\n```") == "```\n>>> kept\n```"
