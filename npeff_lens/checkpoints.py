"""Checkpoints of an NPEFF fit: the state every ``checkpoint_every`` steps, from which an interrupted fit resumes
and ends where an uninterrupted one would.

``root/latest.json`` names the newest ``root/step-XXXXXXXX/``, which holds ``state.safetensors`` (H and the loss
histories, from rank 0) and one ``W-<lo>-<hi>.safetensors`` per rank (its rows of W); the newest two steps are
kept, so a damaged newest one falls back to the one before. ``latest.json`` also records the
:func:`fingerprint` of the fit: a checkpoint of another fit is a ``ConfigMismatchError`` naming the differing
fields. Every file is written atomically, with a checksum (:mod:`npeff_lens.saving`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from .config import check_same
from .errors import CorruptFileError
from .io import atomic_write, read_json
from .saving import load_tensors, save_tensors
from .sources import rank_and_world, resolve_dtype

__all__ = ["Checkpoints", "fingerprint"]


def fingerprint(params: dict, m: int, r: int, d: int) -> dict:
    """What a checkpoint must share with the fit that resumes it (the data's shape and the numerics), from the
    fit's hyper-parameters (``NPEFF``'s names) and the data's ``m`` examples of ``r`` rows and ``d`` dims.

    ``storage_dtype`` is there only when it differs from ``dtype``: checkpoints written before it existed
    (G held in the working dtype) resume as before."""
    dtype = resolve_dtype(params["dtype"])
    storage = dtype if params.get("storage_dtype") is None else resolve_dtype(params["storage_dtype"], "storage_dtype")
    out = {
        "n_components": params["n_components"],
        "m": m,
        "rows": r,
        "dim": d,
        "seed": params["seed"],
        "lr": params["lr"],
        "warmup_lr": params["warmup_lr"],
        "n_warmup_steps": params["n_warmup_steps"],
        "eps": params["eps"],
        "dtype": str(dtype),
        "init": params["init"],
    }
    if storage != dtype:
        out["storage_dtype"] = str(storage)
    return out


class Checkpoints:
    """The checkpoints in ``root`` of the fit with this ``fingerprint``, as this rank (rows ``[lo, hi)`` of W)
    writes and reads them."""

    def __init__(self, root: str | os.PathLike, lo: int, hi: int, fingerprint: dict):
        self.root, self.lo, self.hi, self.fingerprint = Path(root), lo, hi, fingerprint

    def save(self, step: int, W: torch.Tensor, H: torch.Tensor, hist: list, hist_w: list) -> None:
        """The state after ``step`` steps: this rank's rows of W; H and the loss histories (rank 0)."""
        rank, world = rank_and_world()
        barrier = torch.distributed.barrier if world > 1 else (lambda: None)
        step_dir = self.root / f"step-{step:08d}"
        if rank == 0:
            step_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        save_tensors(step_dir / f"W-{self.lo:012d}-{self.hi:012d}.safetensors", {"W": W})
        if rank == 0:
            state = {"H": H, "loss": torch.tensor(hist, dtype=torch.float64)}
            state["loss_w"] = torch.tensor(hist_w, dtype=torch.float64)
            save_tensors(step_dir / "state.safetensors", state)
        barrier()
        if rank == 0:  # the newest two are kept: a damaged newest one falls back to the one before
            previous = read_json(self.root / "latest.json") if (self.root / "latest.json").exists() else {}
            meta = {"step": step, "dir": step_dir.name, "fingerprint": self.fingerprint}
            if previous.get("dir") not in (None, step_dir.name):
                meta["previous"] = {"step": previous["step"], "dir": previous["dir"]}
            atomic_write(self.root / "latest.json", json.dumps(meta, indent=1))
            keep = {step_dir.name, meta.get("previous", {}).get("dir")}
            for old in self.root.glob("step-*"):
                if old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load(self, dtype: torch.dtype, device: torch.device):
        """``(step, W, H, hist, hist_w)`` of the latest intact checkpoint (None when there is none); a checkpoint
        of another fit is a ``ConfigMismatchError`` naming the differing fields."""
        root = self.root
        if not (root / "latest.json").exists():
            return None
        meta = read_json(root / "latest.json")
        check_same(
            meta["fingerprint"],
            self.fingerprint,
            f"the checkpoint in {root}",
            hint="use another checkpoint_dir or delete it",
        )
        for candidate in (meta, meta.get("previous")):
            if candidate is None:
                continue
            try:
                return self._load_step(int(candidate["step"]), root / candidate["dir"], dtype, device)
            except (CorruptFileError, FileNotFoundError) as e:
                warnings.warn(
                    f"NPEFF: checkpoint step {candidate['step']} is damaged ({e}); trying the one before",
                    RuntimeWarning,
                    stacklevel=3,
                )
        warnings.warn(f"NPEFF: no intact checkpoint in {root}; the fit starts again", RuntimeWarning, stacklevel=3)
        return None

    def _load_step(self, step: int, step_dir: Path, dtype, device):
        lo, hi = self.lo, self.hi
        state = load_tensors(step_dir / "state.safetensors")
        W = torch.empty(hi - lo, self.fingerprint["n_components"], dtype=dtype)
        covered = 0
        for f in sorted(step_dir.glob("W-*.safetensors")):
            a, b = (int(x) for x in f.stem.split("-")[1:3])
            x, y = max(a, lo), min(b, hi)
            if x < y:
                W[x - lo : y - lo] = load_tensors(f)["W"][x - a : y - a].to(dtype)
                covered += y - x
        if covered != hi - lo:
            raise CorruptFileError(f"the checkpoint in {step_dir} does not cover examples [{lo}, {hi})")
        # clone: a fresh, aligned buffer; BLAS takes another path (other rounding) on the loaded one
        H = state["H"].to(device=device, dtype=dtype).clone()
        # hist[:step]: the loss after `step` steps is recomputed by the next sweep
        return step, W.to(device), H, state["loss"].tolist()[:step], state["loss_w"].tolist()[:step]
