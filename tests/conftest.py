import os

import pytest
from helpers import LABELS, TEMPLATE

# The Triton interpreter must be chosen before triton is imported (it reads the variable at
# decoration time); on a machine without CUDA the kernels are tested through it.
if os.environ.get("NPEFF_TRITON_COMPILED") != "1":
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:  # pragma: no cover
        os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def adapter():
    """tiny-llama (hf backend), loaded once per test module."""
    from npeff_lens.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def task(adapter):
    """The review task bound to tiny-llama; its two labels are two distinct tokens."""
    from npeff_lens.tasks import LabelTokens

    t = LabelTokens(TEMPLATE, LABELS).bind(adapter)
    assert len(set(t.token_ids)) == 2
    return t


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on a shared machine: more threads only add contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
