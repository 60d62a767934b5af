"""The errors a caller can act on, shared by every module.

:class:`SettingError` is bad input that a setting fixes. Its message names the settings through placeholders,
so the same error reads in the caller's own words: ``str(e)`` spells them as Python writes them
(``drop_invalid=True``), and the command line spells them as flags (``--drop-invalid``) through
:meth:`SettingError.render`. The library itself never names a flag.

:class:`NotFittedError` is what every estimator raises when it is used before ``fit`` or ``load``; like
scikit-learn's, it is both a ``ValueError`` and an ``AttributeError``.

>>> e = SettingError("pass {drop_invalid} to leave the rows out", drop_invalid="drop_invalid=True")
>>> str(e)
'pass drop_invalid=True to leave the rows out'
>>> e.render(lambda field: "--" + field.replace("_", "-"))
'pass --drop-invalid to leave the rows out'
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

__all__ = ["SettingError", "NotFittedError", "CorruptFileError", "as_flag", "literal", "warn_caller"]


def literal(text: str) -> str:
    """``text`` as it must appear in a :class:`SettingError` template to be shown as it is (braces doubled)."""
    return str(text).replace("{", "{{").replace("}", "}}")


def as_flag(field: str) -> str:
    """A setting's command-line spelling: ``drop_invalid`` -> ``--drop-invalid``."""
    return "--" + field.replace("_", "-")


class SettingError(ValueError):
    """Bad input that a setting fixes.

    ``template`` is the message with one ``{field}`` placeholder per setting it names; each keyword gives that
    setting's Python spelling (``drop_invalid="drop_invalid=True"``; an empty string means the field's name).
    ``fields`` keeps the names as data, for callers that react to a particular setting.
    """

    def __init__(self, template: str, **fields: str):
        self.template = template
        self.python = {name: spelling or name for name, spelling in fields.items()}
        self.fields = tuple(fields)
        super().__init__(self.render(self.python.__getitem__))

    def render(self, spell: Callable[[str], str]) -> str:
        """The message with every setting spelled by ``spell(field)`` (e.g. :func:`as_flag`)."""
        return self.template.format(**{name: spell(name) for name in self.fields})

    def __reduce__(self):  # pickles across processes (torchrun ranks) with its fields
        return _rebuild, (type(self), self.template, self.python)


def _rebuild(cls, template: str, python: dict[str, str]) -> SettingError:
    return cls(template, **python)


class NotFittedError(ValueError, AttributeError):
    """An estimator was used before ``fit`` (or ``load``)."""


class CorruptFileError(ValueError):
    """A saved file cannot be read, or its tensors differ from the checksum written with them."""


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointed at the first frame outside npeff_lens: the line of the caller's code that led to
    it, however deep inside the package it was raised."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "npeff_lens":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
