import os

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
