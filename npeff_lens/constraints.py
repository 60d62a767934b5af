"""NPEFF's hyper-parameters: one constraint per argument of ``NPEFF.__init__``, checked in one place for the
estimator and the decompose step alike (scikit-learn's ``_parameter_constraints`` pattern). Imports nothing."""

from __future__ import annotations

import math

__all__ = ["ParameterError", "validate_params"]


class _Constraint:
    """A kind of admissible value; ``text`` completes "<name> must be ..."."""

    text = "anything"

    def ok(self, value) -> bool:
        return True

    def check(self, name: str, value) -> None:
        if not self.ok(value):
            raise ParameterError(name, f"must be {self.text}; got {value!r}")


class _Int(_Constraint):
    """An ``int`` (not a bool, unless ``bool_ok``) ``>= low`` (any integer when ``low`` is None)."""

    def __init__(self, low: int | None, *, bool_ok: bool = False):
        self.low, self.bool_ok = low, bool_ok
        self.text = "an integer" if low is None else f"an integer >= {low}"

    def ok(self, value) -> bool:
        if not isinstance(value, int) or (isinstance(value, bool) and not self.bool_ok):
            return False
        return self.low is None or value >= self.low


class _Real(_Constraint):
    """A finite ``int`` or ``float`` (not a bool), ``> 0`` when ``positive`` else ``>= 0``."""

    def __init__(self, *, positive: bool):
        self.positive = positive
        self.text = "a positive finite number" if positive else "a finite number >= 0"

    def ok(self, value) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        return value > 0 if self.positive else value >= 0


class _OneOf(_Constraint):
    def __init__(self, *choices: str):
        self.choices = choices
        self.text = "one of " + ", ".join(repr(c) for c in choices)

    def ok(self, value) -> bool:
        return isinstance(value, str) and value in self.choices


class _Bool(_Constraint):
    text = "True or False"

    def ok(self, value) -> bool:
        return isinstance(value, bool)


_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64", "half", "float", "double")


class _DType(_Constraint):
    text = "a floating torch dtype (or its name, e.g. 'float32')"

    def ok(self, value) -> bool:  # by name: a torch.dtype prints as "torch.float32"; no torch import here
        name = str(value).removeprefix("torch.")
        return name in _FLOAT_DTYPES and (isinstance(value, str) or type(value).__name__ == "dtype")


class _Optional(_Constraint):
    def __init__(self, inner: _Constraint):
        self.inner = inner
        self.text = f"None or {inner.text}"

    def ok(self, value) -> bool:
        return value is None or self.inner.ok(value)


_PARAMETER_CONSTRAINTS: dict[str, _Constraint] = {
    "n_components": _Int(1),
    "n_steps": _Int(0),
    "n_warmup_steps": _Int(0),
    "lr": _Real(positive=True),
    "warmup_lr": _Real(positive=True),
    "init": _OneOf("random", "custom"),
    "seed": _Int(None),
    "eps": _Real(positive=False),
    "device": _Constraint(),
    "dtype": _DType(),
    "storage_dtype": _Optional(_DType()),
    "memory_budget": _Int(0),
    "batch_size": _Optional(_Int(1)),
    "nonfinite": _OneOf("raise", "exclude"),
    "checkpoint_dir": _Constraint(),
    "checkpoint_every": _Int(1),
    "callback": _Constraint(),
    "progress": _Bool(),
    "verbose": _Int(0, bool_ok=True),
}


class ParameterError(ValueError):
    """A hyper-parameter of NPEFF out of its range; ``name`` is the parameter, the message starts with it."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message}")
        self.name, self.reason = name, message


def validate_params(params: dict) -> None:
    """Checks NPEFF hyper-parameters (any subset of ``NPEFF.__init__``'s arguments) against the one table of
    constraints; :class:`ParameterError` (a ``ValueError``) names the parameter, e.g.
    ``"lr must be a positive finite number; got -1.0"``."""
    for name, value in params.items():
        constraint = _PARAMETER_CONSTRAINTS.get(name)
        if constraint is None:
            raise ParameterError(name, f"is not a parameter of NPEFF; valid: {sorted(_PARAMETER_CONSTRAINTS)}")
        constraint.check(name, value)
