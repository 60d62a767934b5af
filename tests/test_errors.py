"""The errors a caller acts on: a SettingError reads in Python words and renders as the command line's flags, with
data text shown as it is; NotFittedError is a ValueError and an AttributeError; warnings point at the caller."""

from __future__ import annotations

import pickle
import warnings

import pytest

from npeff_lens.cli import flag_speller
from npeff_lens.commands import DecomposeCommand
from npeff_lens.errors import NotFittedError, SettingError, as_flag, literal, warn_caller


def test_a_setting_error_speaks_python_and_renders_flags():
    e = SettingError(
        f"{literal('{odd} label')} is invalid: pass {{drop_invalid}} or fix {{n_components}}",
        drop_invalid="drop_invalid=True",
        n_components="",
    )
    assert str(e) == "{odd} label is invalid: pass drop_invalid=True or fix n_components"
    assert e.fields == ("drop_invalid", "n_components")
    assert e.render(as_flag) == "{odd} label is invalid: pass --drop-invalid or fix --n-components"
    # the command line's own spelling: DecomposeConfig.n_components is --components, the store a flag too
    assert e.render(flag_speller(DecomposeCommand)) == "{odd} label is invalid: pass --drop-invalid or fix --components"
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is SettingError and str(again) == str(e) and again.fields == e.fields
    assert isinstance(e, ValueError)


def test_not_fitted_is_a_value_error_and_an_attribute_error():
    class Estimator:
        @property
        def components_(self):
            raise NotFittedError("not fitted yet")

    assert not hasattr(Estimator(), "components_")
    with pytest.raises(ValueError):
        _ = Estimator().components_


def test_a_warning_points_at_the_first_line_outside_the_package():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warn_caller("look here", RuntimeWarning)
    assert seen[0].filename == __file__ and seen[0].category is RuntimeWarning
