"""Execute the tutorial notebook and write it with its outputs.

``python tools/run_tutorial.py [--out docs/tutorial.ipynb] [--timeout SECONDS]`` reads ``docs/tutorial.py`` (a
jupytext "percent" script), runs every cell in a fresh IPython kernel and writes the executed notebook. The kernel
is this interpreter (``sys.executable``), declared in a kernel spec written to a temporary folder for the run, so no
user-level Jupyter set-up is read or needed; it imports ``npeff_lens`` from this checkout. The notebook runs in a
fresh temporary working directory (its run folder never lands in the repository) unless ``--workdir`` names one.

A cell that raises stops the run: the cell's error is printed and the exit status is 1 (2 for a bad argument or a
missing tool). Standard library plus jupytext, nbclient and nbformat (the ``docs`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "docs" / "tutorial.py"
KERNEL = "npeff-tutorial"  # the kernel spec this script writes for its own run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_tutorial.py",
        description="Execute docs/tutorial.py as a notebook in a fresh kernel and write it with its outputs.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "tutorial.ipynb",
        metavar="PATH",
        help="where to write the executed notebook (default: docs/tutorial.ipynb); written only when every cell ran",
    )
    p.add_argument(
        "--timeout",
        type=int,
        default=1200,
        metavar="SECONDS",
        help="most seconds one cell may run before the run stops with an error (default: 1200)",
    )
    p.add_argument(
        "--source",
        type=Path,
        default=SOURCE,
        metavar="PATH",
        help="the jupytext script to execute (default: docs/tutorial.py)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        metavar="DIR",
        help="working directory of the kernel, kept afterwards (default: a fresh temporary directory, removed at the "
        "end): the notebook's run folder is written there",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing while the cells run (errors are still printed)")
    return p


def _kernel_spec(folder: Path) -> None:
    """A kernel spec for this interpreter in ``folder/kernels/KERNEL``, importing the package from this checkout."""
    spec_dir = folder / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "env": {"PYTHONPATH": path},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))


def run(source: Path, out: Path, timeout: int, workdir: Path | None = None, quiet: bool = False) -> None:
    """Execute ``source`` and write the notebook to ``out``; a failing cell raises nbclient's ``CellExecutionError``."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(source)
    kernelspec = dict(nb.metadata.get("kernelspec") or {})
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    with tempfile.TemporaryDirectory(prefix="npeff-tutorial-") as tmp:
        tmp = Path(tmp)
        _kernel_spec(tmp / "jupyter")
        cwd = workdir if workdir is not None else tmp / "work"
        cwd.mkdir(parents=True, exist_ok=True)
        # our spec is found first; the variable is read when the kernel spec manager is made, in this process
        before = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(tmp / "jupyter"), before) if p)
        done, t0, started = [0], time.time(), [time.time()]

        def cell_start(cell, cell_index):
            started[0] = time.time()

        def cell_done(cell, cell_index, **_):
            done[0] += 1
            if not quiet:
                print(
                    f"[tutorial] cell {done[0]}/{n_code} done in {time.time() - started[0]:.1f} s "
                    f"({time.time() - t0:.0f} s in all)",
                    file=sys.stderr,
                    flush=True,
                )

        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name=KERNEL,
            resources={"metadata": {"path": str(cwd)}},
            record_timing=False,
            on_cell_execute=cell_start,
            on_cell_executed=cell_done,
        )
        log_path = tmp / "kernel.log"  # the kernel process's own output (not the cells'): shown when the run fails
        try:
            with open(log_path, "wb") as log:
                client.execute(stdout=log, stderr=log)
        except Exception:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-20:] if log_path.exists() else []
            if tail:
                print("[tutorial] the kernel's own output (last lines):", *tail, sep="\n  ", file=sys.stderr)
            raise
        finally:
            if before is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = before
    if kernelspec:  # the notebook names the usual kernel, not this run's temporary one
        nb.metadata["kernelspec"] = kernelspec
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    if not quiet:
        print(f"[tutorial] {n_code} code cells ran in {time.time() - t0:.0f} s; wrote {out}", file=sys.stderr)


def _missing(error: ImportError) -> int:
    hint = "install the docs extra (pip install -e '.[docs]', or make setup)"
    print(f"run_tutorial.py: {error}; {hint}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not args.source.is_file():
        print(f"run_tutorial.py: {args.source} does not exist", file=sys.stderr)
        return 2
    if args.timeout < 1:
        print("run_tutorial.py: --timeout must be at least 1 second", file=sys.stderr)
        return 2
    try:
        from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    except ImportError as e:
        return _missing(e)
    try:
        run(args.source, args.out, args.timeout, args.workdir, args.quiet)
    except ImportError as e:
        return _missing(e)
    except CellExecutionError as e:
        print(f"run_tutorial.py: a cell of {args.source} failed:\n{e}", file=sys.stderr)
        return 1
    except (CellTimeoutError, DeadKernelError) as e:
        print(f"run_tutorial.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
