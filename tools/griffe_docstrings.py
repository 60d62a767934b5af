"""A griffe extension for the documentation site (mkdocs.yml loads it into mkdocstrings): our docstrings are
written for people reading the source, in reST habits, and this turns them into the Markdown the site renders.

- Sphinx roles (:func:`x`, :class:`~a.b.C`, :mod:`.sub`, :meth:`C.m`, ...) become cross-references: the name is
  resolved as Python would from the docstring's scope (the class, its module, that module's imports) and linked
  where the site documents it; a name the site does not document stays code, without a broken link.
- Doctest lines (``>>>`` and what follows them) become ``pycon`` code blocks, where Markdown would otherwise read
  ``>>>`` as nested quotes and ``x["a"][:5]`` as a link.
- A reST literal-block marker ``text::`` reads ``text:`` (the indented block after it is already code).

Only the package's own objects are touched, once, after the package is loaded.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

PACKAGE = "npeff_lens"
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(?P<body>[^`]+)`")
STYLE_ORDER = ["numpy", "google"]  # as mkdocs.yml's docstring_options.style_order
SECTION_TITLE = re.compile(r"^\s*[A-Za-z][\w\s-]*:\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def _lookup(collection, path: str):
    try:
        return collection[path]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _canonical(found) -> str:
    return found.target_path if found.is_alias else found.path


def resolve(obj, name: str) -> str | None:
    """The canonical path of ``name`` as written in ``obj``'s docstring, or None when it is not the package's."""
    collection = obj.modules_collection
    name = name.removesuffix("()")
    module = obj if obj.is_module else obj.module
    if name.startswith("."):
        # relative to the module (a package's own submodules), then to its parent package
        scopes = [module.path] + ([module.parent.path] if module.parent is not None else [])
        candidates = [scope + name for scope in scopes]
    elif name.split(".")[0] == obj.package.name:
        candidates = [name]
    else:
        scopes, scope = [], obj if (obj.is_class or obj.is_module) else obj.parent
        while scope is not None:
            scopes.append(scope.path)
            scope = scope.parent
        candidates = [f"{scope}.{name}" for scope in scopes]
        # a name the module imports: its first part is an alias in the module
        head, _, rest = name.partition(".")
        member = module.members.get(head)
        if member is not None and member.is_alias:
            candidates.append(member.target_path + ("." + rest if rest else ""))
    for candidate in candidates:
        found = _lookup(collection, candidate) or _lookup_lazy(collection, candidate)
        if found is not None:
            return _canonical(found)
    return None


def _lookup_lazy(collection, path: str):
    """``package.name`` where the package exports ``name`` lazily (its ``_LAZY = {name: module}`` table)."""
    package, _, name = path.rpartition(".")
    head, _, rest = name.partition(".")
    lazy = _lookup(collection, package + "._LAZY")
    if lazy is None or lazy.value is None:
        return None
    try:
        table = ast.literal_eval(str(lazy.value))
    except (ValueError, SyntaxError):
        return None
    if head not in table:
        return None
    target = table[head] if table[head].endswith("." + head) else f"{table[head]}.{head}"  # a module, or a name in one
    return _lookup(collection, f"{target}.{rest}" if rest else target)


def roles_to_refs(text: str, obj) -> str:
    """Every Sphinx role in ``text`` as an optional autorefs cross-reference (code when the target is absent)."""

    def replace(match: re.Match) -> str:
        body = match["body"].strip()
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^<>]+)>", body)
        if explicit:
            title, target = explicit["title"], explicit["target"]
        else:
            target = body
            short = body.startswith("~")
            target = target.lstrip("~")
            title = target.removesuffix("()").rsplit(".", 1)[-1] if short else target.lstrip(".")
        identifier = resolve(obj, target.lstrip("~")) or target.lstrip("~.")
        if "`" in title:
            return f"`{target}`"
        return f'<autoref identifier="{identifier}" optional>`{title}`</autoref>'

    return ROLE.sub(replace, text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _in_section(lines: list[str], start: int, indent: int) -> bool:
    """Whether line ``start`` (indented by ``indent``) is the content of a Google section or admonition: the
    nearest less-indented line above it is a title ("Example:") with its content on the very next line."""
    for j in range(start - 1, -1, -1):
        if lines[j].strip() and _indent(lines[j]) < indent:
            return bool(SECTION_TITLE.match(lines[j])) and bool(lines[j + 1].strip())
    return False


def fence_doctests(text: str, *, sections: bool = False) -> str:
    """Doctest blocks as fenced ``pycon`` code; reST ``text::`` as ``text:``. Lines already in code are kept.

    ``sections``: the docstring is parsed for Google sections. griffe dedents a section's content, so a block in
    one keeps its indent; anywhere else an indented fence would read as code, so the block is dedented."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    in_fence = False
    literal_indent = None  # the indent of the line that opened a reST literal block
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if FENCE.match(line):
            in_fence = not in_fence
        if in_fence or FENCE.match(line):
            out.append(line)
            i += 1
            continue
        if literal_indent is not None:
            if not stripped or _indent(line) > literal_indent:
                out.append(line)
                i += 1
                continue
            literal_indent = None
        if stripped.startswith(">>>"):
            indent = line[: _indent(line)]
            block = []
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) == len(indent):
                block.append(lines[i])
                i += 1
            if sections and _in_section(lines, i - len(block), len(indent)):
                out += [indent + "```pycon", *block, indent + "```"]  # right under its title, still its content
            else:
                if out and out[-1].strip():
                    out.append("")
                out += ["```pycon", *(b[len(indent) :] for b in block), "```"]
            if i < len(lines) and lines[i].strip():
                out.append("")
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            literal_indent = _indent(line)
            line = line.rstrip()[:-1]
            if not line.strip().rstrip(":"):  # a line that is only "::"
                line = ""
        out.append(line)
        i += 1
    return "\n".join(out)


class Docstrings(griffe.Extension):
    """Rewrites the package's docstrings once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        seen: set[str] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.path in seen:
                continue
            seen.add(obj.path)
            if obj.docstring is not None:
                style, _ = griffe.infer_docstring_style(obj.docstring, style_order=STYLE_ORDER, default=None)
                text = fence_doctests(obj.docstring.value, sections=style == griffe.Parser.google)
                obj.docstring.value = roles_to_refs(text, obj)
            stack += [member for member in obj.members.values() if not member.is_alias]
