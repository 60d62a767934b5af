"""Saving fitted estimators and checkpoints: tensors in safetensors files that carry a checksum, and a JSON config
beside them.

:func:`save_tensors` writes a safetensors file whose metadata holds the CRC-32 of its tensors' bytes, and
:func:`load_tensors` reads it back. Loading a damaged file (unreadable, truncated, or with tensors that differ
from the checksum) raises a :class:`~npeff_lens.errors.CorruptFileError` naming it. A file without a checksum
(written before files had one) is trusted.

:class:`SavedFormat` describes a fitted estimator's folder: its tensors (written through :func:`save_tensors`)
and its JSON config, which starts with the format's name and is written last, so that a folder holding it holds
a complete save. Every file is written atomically (:mod:`npeff_lens.io`). ``NPEFF``, ``GradientClustering`` and the
  activation-space baselines save through it.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptFileError
from .io import atomic_write, read_json, write_json

__all__ = ["SavedFormat", "checksum", "load_tensors", "save_tensors"]

CHECKSUM_KEY = "crc32"  # the metadata entry of a safetensors file that holds the checksum


def checksum(tensors: dict[str, torch.Tensor]) -> int:
    """CRC-32 of the tensors' bytes (CPU tensors), in the order of their sorted names."""
    crc = 0
    for k in sorted(tensors):
        crc = zlib.crc32(memoryview(tensors[k].contiguous().view(-1).view(torch.uint8).numpy()), crc)
    return crc


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` into the safetensors file ``path`` (atomically), with their :func:`checksum` in its metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, save(tensors, metadata={CHECKSUM_KEY: str(checksum(tensors))}))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, or a ``CorruptFileError`` naming it (files without a checksum are trusted)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise CorruptFileError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if CHECKSUM_KEY in meta and int(meta[CHECKSUM_KEY]) != checksum(tensors):
        raise CorruptFileError(f"{path} is damaged: the checksum of its tensors differs from the one written")
    return tensors


@dataclass(frozen=True)
class SavedFormat:
    """A fitted estimator's folder: ``tensors_file`` (:func:`save_tensors`) and ``config_file``, JSON that starts
    ``{key: name}`` (then ``"format_version": version`` when the format has a version) and is written last.

    ``what`` names the estimator in errors (default ``"a <name>"``)."""

    name: str
    tensors_file: str
    config_file: str
    version: int | None = None
    key: str = "class"
    what: str | None = None

    def _what(self) -> str:
        return self.what or f"a {self.name}"

    def save(self, directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
        """Writes the tensors, then the config (its header first); returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        header = {self.key: self.name}
        if self.version is not None:
            header["format_version"] = self.version
        save_tensors(directory / self.tensors_file, tensors)
        write_json(directory / self.config_file, {**header, **config})
        return directory

    def load(self, directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(config, tensors)`` of a folder written by :meth:`save`; another format is a one-line error, a damaged
        tensors file a ``CorruptFileError``."""
        directory = Path(directory)
        path = directory / self.config_file
        if not path.exists():
            raise FileNotFoundError(f"{directory} holds no {self.config_file}: it does not hold {self._what()}")
        config = read_json(path)
        if config.get(self.key) != self.name:
            raise ValueError(f"{directory} does not hold {self._what()} ({self.config_file}: {config.get(self.key)!r})")
        if self.version is not None and config.get("format_version") != self.version:
            raise ValueError(f"{path}: unsupported format {config.get('format_version')!r}")
        return config, load_tensors(directory / self.tensors_file)
