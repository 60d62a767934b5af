"""Collecting a dataset's per-example Fishers (PEFs) into a store, batch by batch and resumably.

The PEFs themselves are computed by :mod:`npeff_lens.pef`; this module drives the collection (§2.1 of the paper).

:func:`collect_pefs` is the driver: it reads the data and matches its labels to the task's outcomes, records what
the store holds (configuration, model, task, dataset digest, parameter layout, projection), plans the batches still
missing (so that a rerun resumes without losing or duplicating an example), and writes them, in one process or over
the ranks of ``torchrun`` (:mod:`npeff_lens.distributed`). SIGINT and SIGTERM commit what was computed, then raise
:class:`Interrupted`. What it has to say (rows left out, examples flagged, prompts shortened, the store's size) goes
to the ``npeff_lens.collect`` logger at INFO.

Each batch is then finished on its device (non-finite examples zeroed and flagged, norms) and copied to the host
once, where the rank reduction and the metadata follow (:class:`PendingBatch`, :func:`finish_batch`). On CUDA the
copy goes to pinned memory behind an event, and a single-process collection writes the batch to the store after
queueing the next one, so the store's write overlaps the device's work (under torchrun each round's batches are
gathered, then written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import warnings
from collections import Counter
from pathlib import Path

import torch

from . import distributed
from .config import CollectConfig
from .data import align_labels, load_dataset
from .errors import SettingError
from .io import DeferredSignals, progress, read_json
from .layout import parameter_layout
from .models import ModelAdapter, adapt
from .pef import PEFComputer, pef_frobenius_norms, reduce_rank
from .projection import HAVE_NUMBA, KroneckerProjection, Projection, SparseProjection, start_numba_threads
from .store import PEFStore
from .tasks import Task, shortened_note

__all__ = [
    "Interrupted",
    "PendingBatch",
    "class_balance",
    "collect_pefs",
    "dataset_digest",
    "finish_batch",
    "make_projection",
]

logger = logging.getLogger(__name__)


def _collected_rows(dataset, task: Task, cfg: CollectConfig):
    """``(dataset, its record for the manifest, n)``: the rows to collect, their labels numbered as the (bound) task's
    outcomes (:func:`~npeff_lens.data.align_labels`), what was left out or mapped by position said once (rank 0),
    and the record's digest of the first ``n`` rows."""
    dataset, data_info, source_rows = _dataset_rows(dataset, cfg)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    aligned = align_labels(
        dataset,
        task.outcome_names(),
        drop_invalid=cfg.drop_invalid,
        source=f"the dataset {data_info['name']!r}",
        rows=source_rows,
    )
    dataset = aligned.dataset
    if aligned.dropped and distributed.rank() == 0:
        rows_text = ", ".join(map(str, aligned.dropped[:8])) + (" ..." if len(aligned.dropped) > 8 else "")
        logger.info("left out %d invalid row(s) of %r (rows %s)", len(aligned.dropped), data_info["name"], rows_text)
    if aligned.by_position and distributed.rank() == 0:
        mapping = ", ".join(f"{i} → {o!r}" for i, o in aligned.by_position.items())
        logger.info(
            "integer labels map to the task's outcomes by position: label %s (label names map them by name)", mapping
        )
    n = len(dataset) if cfg.n is None else cfg.n
    if n > len(dataset):
        raise SettingError(f"{{n}} must be in [1, {len(dataset)}] (the dataset's size), got {n}", n="")
    data_info["sha256"] = dataset_digest(dataset, n)
    return dataset, data_info, n


def _dataset_rows(dataset, cfg: CollectConfig):
    info = {"name": None}
    if isinstance(dataset, (list, tuple)):
        import datasets

        if not all(isinstance(t, str) for t in dataset):
            raise TypeError("a list dataset must hold strings (the texts)")
        dataset = datasets.Dataset.from_dict({"text": list(dataset)})
        info["name"] = "texts"
    elif isinstance(dataset, (str, os.PathLike)):
        info["name"] = os.fspath(dataset)
        columns = {"text": cfg.text_column, "label": cfg.label_column}
        names = list(cfg.label_names) if cfg.label_names else None
        dataset, rows = load_dataset(
            dataset, split=cfg.split, seed=cfg.data_seed, columns=columns, label_names=names, return_rows=True
        )
        return _checked_text_column(dataset), info, rows
    else:
        info["name"] = getattr(dataset, "info", None) and dataset.info.dataset_name or "user"
    return _checked_text_column(dataset), info, None


def _checked_text_column(dataset):
    if "text" not in dataset.column_names:
        raise ValueError(
            f"the dataset needs a 'text' column (it has {dataset.column_names}); "
            "see npeff_lens.load_dataset(..., columns=)"
        )
    return dataset


def dataset_digest(dataset, n: int) -> str:
    """A digest of the texts and labels of the first ``n`` rows: the same data gives the same digest wherever
    its file lies (a ``datasets`` fingerprint changes with the file's path and time). A store records it
    (``manifest["dataset"]["sha256"]``) for the rows it collected."""
    rows = dataset[:n]
    digest = hashlib.sha256()
    for column in ("text", "label"):
        if column in rows:
            digest.update(json.dumps(rows[column], default=str).encode())
    return digest.hexdigest()[:16]


def _as_stored_by_older_version(out, manifest: dict) -> dict:
    """``manifest`` as a store written by an earlier version records it, so that store resumes: collection
    fields added since then are left out where they have their default (the old behaviour), and where the store
    holds no content digest of its data (it recorded a path-dependent fingerprint) the data is checked by name."""
    path = Path(out) / "manifest.json"
    if not path.is_file():
        return manifest
    stored = read_json(path)
    defaults = CollectConfig.default_key()
    kept = stored.get("config") or {}
    config = {k: v for k, v in manifest["config"].items() if k in kept or k not in defaults or v != defaults[k]}
    dataset = manifest["dataset"]
    if "sha256" not in (stored.get("dataset") or {}):
        dataset = {**(stored.get("dataset") or {}), "name": dataset["name"]}
    return {**manifest, "config": config, "dataset": dataset}


def make_projection(cfg: CollectConfig, layout: list[dict]) -> Projection | None:
    """The projection a collection configuration names, over the parameters of ``layout``."""
    if not cfg.proj_dim:
        return None
    if cfg.projection == "kron":
        shapes = [e["shape"] for e in layout]
        return KroneckerProjection(shapes, cfg.proj_dim, seed=cfg.seed, k=cfg.kron_k, density=cfg.density)
    return SparseProjection(sum(e["numel"] for e in layout), cfg.proj_dim, seed=cfg.seed, density=cfg.density)


def collect_pefs(model, dataset, task: Task, out, *, config: CollectConfig | None = None, tokenizer=None, **options):
    """Compute the per-example Fishers (PEFs) of a dataset's examples and write them into a ``PEFStore``.

    Args:
        model: an adapter, or any model ``npeff_lens.adapt`` accepts (with ``tokenizer`` for a bare HF model).
        dataset: a ``datasets.Dataset`` with a ``text`` column, a built-in dataset name or a local file
            (``split`` / ``data_seed`` apply), or a list of texts.
        task: what ``p(y|x)`` is and which outputs' gradients form the PEF (:mod:`npeff_lens.tasks`).
        out: the store's directory.
        config: a :class:`~npeff_lens.config.CollectConfig`, or its fields as keywords (``n``, ``proj_dim``, ...).

    Returns:
        The :class:`~npeff_lens.store.PEFStore` (what ``NPEFF`` fits): each example's low-rank PEF ``G`` (the
        gradients of the task's rows), projected to ``proj_dim`` columns. Per example it also records the
        prediction, the probabilities (top-k for ``NextToken``), the PEF's Frobenius norm, a ``flag``
        (``zero_pef``, ``nonfinite_logits``, ``nonfinite_grad``) where the PEF is stored as zeros, and
        ``text_tokens_cut``, the tokens cut from the end of its text to fit ``max_length``
        (:meth:`~npeff_lens.tasks.Task.fitted_prompts`; never the template).

    Rerunning the same call resumes where it stopped; another configuration into the same ``out`` is a
    ``StoreMismatchError`` naming the differing fields. SIGINT or SIGTERM stops a single-process collection after
    committing what it computed (:class:`Interrupted`, a ``KeyboardInterrupt``); the store also commits at least
    every ``npeff_lens.store.COMMIT_SECONDS``, so even a SIGKILL loses little. Under ``torchrun`` (or inside a
    process group) every rank calls this with the same arguments and rank 0 writes the one store
    (:mod:`npeff_lens.distributed`); the other ranks get a read-only view (None if they cannot see it).

    Example:
        >>> import npeff_lens as nl; from npeff_lens.tasks import LabelTokens
        >>> data = nl.load_dataset("movie-reviews", split="train")
        >>> task = LabelTokens("Review: {text}\\nSentiment:", [" negative", " positive"])
        >>> store = nl.collect_pefs(nl.load_model("smollm2-135m"), data, task, "runs/movie", n=640, density=8)

    Notes: the LRM-PEF is §2.1 of the paper, the sparse projection App. A, the rank reduction App. C.
    """
    cfg = config or CollectConfig()
    if type(cfg) is not CollectConfig:  # a command: its inputs stay out of the store's resume key
        cfg = cfg.narrow(CollectConfig)
    cfg = cfg.replace(**options) if options else cfg
    adapter = model if isinstance(model, ModelAdapter) else adapt(model, tokenizer)
    adapter.eval()
    task.bind(adapter)
    dataset, data_info, n = _collected_rows(dataset, task, cfg)
    named = adapter.named_parameters(include=cfg.params, exclude=cfg.exclude)
    layout = parameter_layout(named)
    n_params = sum(e["numel"] for e in layout)
    projection = make_projection(cfg, layout)
    computer = PEFComputer(adapter, task, named, projection, engine=cfg.engine)
    manifest = {
        "config": cfg.key(),
        "model": {"name": adapter.name, "backend": adapter.backend},
        "task": task.config(),
        "outcomes": task.outcome_names(),
        "dataset": data_info,
        "layout": layout,
        "n_params": n_params,
        "projection": projection.state_dict() if projection is not None else None,
        "pef_rows": task.n_rows,
    }
    manifest = _as_stored_by_older_version(out, manifest)
    rows = cfg.rank if cfg.rank is not None else task.n_rows
    if projection is None:
        _check_unprojected_fits(n_params, task.n_rows, cfg, n)
    _pin_cpu_threads()
    make_writer = _Writers()
    if distributed.active():  # torchrun: the ranks share the examples, rank 0 writes (npeff_lens.distributed)

        def compute(lo, hi):
            return _start_batch(computer, dataset, task, cfg, lo, hi).result()

        steps = distributed.Steps(plan=_plan, compute=compute, writer=make_writer)
        store, flagged = distributed.collect(
            out,
            manifest,
            computer,
            dataset,
            task,
            cfg,
            n,
            rows=rows,
            dim=computer.dim,
            device=str(adapter.device),
            steps=steps,
        )
    else:
        store = PEFStore.create(out, manifest, rows=rows, dim=computer.dim, dtype=cfg.dtype, shard_size=cfg.shard_size)
        _warn_if_resumed_from_right_truncation(store, cfg.max_length, n)
        try:
            flagged = _collect_into(store, computer, dataset, task, cfg, n, make_writer)
        finally:
            store.close()  # releases the writer lock; the store stays readable
    if flagged:
        logger.info(
            "%d example(s) flagged (zero or non-finite PEF, stored as zeros); see the store's metadata 'flag' column",
            flagged,
        )
    make_writer.say_shortened(cfg.max_length)
    if store is not None and distributed.rank() == 0:  # informational, not a progress bar: said without one too
        balance = class_balance(store)
        logger.info("%d examples in %s%s", len(store), store.path, f"; labels: {balance}" if balance else "")
    return store


def _warn_if_resumed_from_right_truncation(store, max_length: int | None, n: int) -> None:
    """A store begun by a version that cut over-long prompts from the right (its rows have no ``text_tokens_cut``)
    and resumed now: its earlier examples longer than ``max_length`` were read without the template's tail."""
    first = 0  # the first example the store holds (a repaired store may miss its first shard)
    for a, b in sorted(store.missing):
        if a <= first < b:
            first = b
    if max_length is None or not 0 < len(store) < n or first >= len(store):
        return
    if "text_tokens_cut" in store.read_metadata(first, first + 1)[0]:
        return
    warnings.warn(
        f"the store {store.path} holds {len(store)} examples collected by an earlier version, which cut prompts longer "
        f"than max_length={max_length} tokens from the right (losing the template's tail) instead of shortening "
        "their text; the examples collected now are shortened. Collect into a new directory to read every example "
        "after the template",
        UserWarning,
        stacklevel=3,
    )


def class_balance(store) -> str | None:
    """``"negative 98, positive 102"``: the examples per label of a store, by the outcome each label was matched to
    (:meth:`~npeff_lens.store.PEFStore.example_labels`; None without labels)."""
    if len(store) == 0 or store.missing:
        return None
    labels = store.example_labels()
    if labels is None:
        return None
    counts = Counter(labels)
    return ", ".join(f"{str(name).strip() or repr(name)} {counts[name]}" for name in sorted(counts, key=str))


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_unprojected_fits(n_params: int, rows: int, cfg: CollectConfig, n: int) -> None:
    """Unprojected PEFs (``proj_dim`` 0) hold every parameter per row: refuse a batch that cannot fit in memory,
    naming the estimate (a batch is computed in fp32; the store holds n x rows x n_params values)."""
    batch = cfg.batch_size * rows * n_params * 4
    available = _available_memory()
    if available is not None and batch > available // 2:
        store = n * (cfg.rank or rows) * n_params * torch.finfo(getattr(torch, cfg.dtype)).bits // 8
        raise SettingError(
            f"unprojected PEFs ({{proj_dim}} 0) of {n_params:,} parameters need ~{batch / 2**30:.1f} GiB per batch of "
            f"{cfg.batch_size} (and {store / 2**30:.1f} GiB of store), more than half of the "
            f"{available / 2**30:.1f} GiB available: project them ({{proj_dim}} 8192), or select fewer parameters "
            "({params})",
            proj_dim="",
            params="",
        )


def _pin_cpu_threads() -> None:
    """Keeps torch's CPU thread count (``OMP_NUM_THREADS``; 1 per rank under torchrun) for the whole collection,
    and gives numba the same. The first parallel numba call (the CPU projection) starts numba's OpenMP layer,
    which sets the process's OpenMP threads to numba's count (all cores): torch ops after it would run with more
    threads than those before it, so the first batch of a process would differ in low bits from the same batch
    computed later (a resumed or multi-process run would then differ from one process), and N ranks would each
    use every core. Started here once, then torch's count is restored (it holds from then on)."""
    threads = torch.get_num_threads()
    start_numba_threads()
    if HAVE_NUMBA:  # its sums never split across threads (one thread per output column): same bits
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def _plan(store, n: int, batch_size: int) -> list[tuple[int, int, bool]]:
    """The batches still to collect, ``(lo, hi, fill)``: the store's missing ranges (shards ``repair``
    removed; ``fill``) first, then ``[len(store), n)``, cut at the batch boundaries of an uninterrupted run
    (a batch is padded to its longest prompt, so other boundaries would change the bytes)."""
    plan = [(lo, min(b, lo + batch_size), True) for a, b in store.missing for lo in range(a, b, batch_size)]
    return plan + [(lo, min(n, lo + batch_size), False) for lo in range(len(store), n, batch_size)]


def _start_batch(computer: PEFComputer, dataset, task: Task, cfg: CollectConfig, lo: int, hi: int) -> PendingBatch:
    """Examples ``[lo, hi)`` computed and on their way to the host: ``.result()`` is ``(pefs [b, rows, dim] on the
    CPU, metadata)``. On CUDA this returns once the host has queued the batch's work, before the device is done."""
    rows = dataset[lo:hi]
    prompts, cut = task.fitted_prompts(computer.adapter.tokenizer, rows["text"], cfg.max_length)
    pefs, log_probs = computer.compute(prompts, max_length=cfg.max_length)
    return PendingBatch(pefs, log_probs, rows, lo, task, cfg.rank, cfg.top_k_probs, text_tokens_cut=cut)


class _Writer:
    """Writes computed batches into the store in plan order, as an uninterrupted run does: a filled
    range is committed at once; appends are flushed every ``flush_every`` examples (and on ``close``)."""

    def __init__(self, store, flush_every: int):
        self.store, self.flush_every, self.since_flush, self.flagged = store, flush_every, 0, 0
        self.text_tokens_cut: list[int] = []  # per example written: tokens removed from its text to fit max_length

    def write(self, lo: int, fill: bool, pefs, meta) -> None:
        self.flagged += sum(m["flag"] is not None for m in meta)
        self.text_tokens_cut += [m.get("text_tokens_cut") or 0 for m in meta]
        if fill:
            self.store.fill(lo, pefs, meta)
            return
        self.store.append(pefs, meta)
        self.since_flush += len(meta)
        if self.since_flush >= self.flush_every:
            self.store.flush()
            self.since_flush = 0


class _Writers:
    """``Steps.writer``: makes the store's writer and keeps it (the one that writes: rank 0's under torchrun), to say
    at the end what it wrote."""

    def __init__(self):
        self.made: list[_Writer] = []

    def __call__(self, store, flush_every: int) -> _Writer:
        self.made.append(_Writer(store, flush_every))
        return self.made[-1]

    def say_shortened(self, max_length: int | None) -> None:
        """One line on the texts shortened to fit ``max_length`` (:meth:`~npeff_lens.tasks.Task.fitted_prompts`)."""
        note = shortened_note(self.made[0].text_tokens_cut, max_length) if self.made else None
        if note:
            logger.info("%s; the store's metadata 'text_tokens_cut' column has the count per example", note)


class Interrupted(KeyboardInterrupt):
    """A collection stopped by SIGINT or SIGTERM (``signum``) after committing the examples computed before it;
    rerunning it resumes after them. The command line prints its message and exits with ``128 + signum``."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = int(signum)
        super().__init__(message or f"interrupted by {signal.Signals(self.signum).name}")

    def __reduce__(self):
        return type(self), (self.signum, str(self))


class _Interruptions(DeferredSignals):
    """While a collection runs: SIGTERM is handled like SIGINT, both raising :class:`Interrupted` so that the
    collector commits what it computed; a signal inside a store write is raised when the write is done, and
    further signals are dropped until the collection has committed and exited. Only default handlers are
    replaced (:class:`~npeff_lens.io.DeferredSignals`)."""

    only_default = True

    def _raise(self, signum: int) -> None:
        self.hold()
        raise Interrupted(signum)


def _collect_into(
    store, computer: PEFComputer, dataset, task: Task, cfg: CollectConfig, n: int, make_writer=None
) -> int:
    """Recollects the store's missing ranges (shards ``repair`` removed), then appends examples
    ``[len(store), n)``, flushing every ``cfg.flush_every`` (``make_writer``: makes the writer, e.g. a
    :class:`_Writers` that keeps it to report what it wrote); returns the number flagged. SIGINT or SIGTERM commits
    what was computed, then raises :class:`Interrupted` naming the examples the store keeps."""
    plan = _plan(store, n, cfg.batch_size)
    if not plan:
        return 0
    bar = progress(total=sum(hi - lo for lo, hi, _ in plan), desc="collect", unit="ex", enabled=cfg.progress)
    writer = (make_writer or _Writer)(store, cfg.flush_every)
    waiting = None  # (lo, fill, a batch in flight to the host): written once the next batch is queued

    def write(item) -> None:
        lo, fill, batch = item
        pefs, meta = batch.result()
        writer.write(lo, fill, pefs, meta)
        bar.update(len(meta))

    with _Interruptions() as signals:
        try:
            try:
                for lo, hi, fill in plan:
                    started = (lo, fill, _start_batch(computer, dataset, task, cfg, lo, hi))
                    # A signal meanwhile is raised once the batches are written, and the computed batch is never
                    # out of reach of the finally below. A batch still in flight to the host (CUDA) is written
                    # after the next one is queued, so the store's write overlaps the device's work.
                    with signals.writing():
                        previous, waiting = waiting, started
                        if previous is not None:
                            try:
                                write(previous)
                            except BaseException:
                                waiting = None  # nothing is written after a failed write
                                raise
                        if not started[2].in_flight:
                            waiting = None
                            write(started)
            finally:
                with signals.writing():
                    try:
                        if waiting is not None:  # computed before an interruption or a failure: kept
                            item, waiting = waiting, None
                            write(item)
                    finally:
                        store.flush()
                bar.close()
        except Interrupted as e:
            kept = store.committed - sum(b - a for a, b in store.missing)
            raise Interrupted(
                e.signum,
                f"{e}; the PEF store at {store.path} keeps its {kept} committed examples; rerun the same command "
                "to resume",
            ) from None
    return writer.flagged


def finish_batch(pefs, log_probs, rows, lo, task, rank, top_k_probs, text_tokens_cut=None):
    """A computed batch as the store holds it: PEFs of non-finite examples zeroed and flagged, the rank reduction
    (App. C), and one metadata row per example (its prediction, probabilities, norm, flag, and with
    ``text_tokens_cut``, the counts of :meth:`~npeff_lens.tasks.Task.fitted_prompts`, how many tokens of its text
    were removed to fit ``max_length``); ``npeff explain`` finishes its inputs' PEFs the same way. Returns ``(pefs
    on the CPU, metadata)``."""
    return PendingBatch(pefs, log_probs, rows, lo, task, rank, top_k_probs, text_tokens_cut).result()


class PendingBatch:
    """A batch being finished (:func:`finish_batch`) in two halves, so that the host can queue the next batch
    while the device completes this one. Made at once: the tensor work on the batch's device (zeroing, norms),
    then one copy of its results to the host: on CUDA, up to ``PINNED_BYTES``, into pinned memory without
    blocking, behind an event recorded on the copying device's stream. ``result()`` waits for that event alone,
    not for the device, then does the host's half: the rank reduction (App. C; on the host, where its
    eigendecomposition does not stall the device) and the metadata, from the copies (no per-example reads of
    device memory)."""

    PINNED_BYTES = 256 * 2**20  # a larger batch (unprojected PEFs) is copied synchronously: page-locked memory
    # is cached by torch's host allocator, and two batches of it would be held at once

    def __init__(self, pefs, log_probs, rows, lo, task, rank, top_k_probs, text_tokens_cut=None):
        self.rows, self.lo, self.task, self.rank, self.top_k_probs = rows, lo, task, rank, top_k_probs
        self.text_tokens_cut = text_tokens_cut
        finite_logits = torch.isfinite(log_probs).all(-1)
        finite_pef = torch.isfinite(pefs).flatten(1).all(-1)
        pefs = torch.where((finite_logits & finite_pef)[:, None, None], pefs, torch.zeros_like(pefs))
        tensors = (pefs, log_probs.exp(), finite_logits, finite_pef, pef_frobenius_norms(pefs))
        self.event = None
        if pefs.is_cuda and sum(t.numel() * t.element_size() for t in tensors) <= self.PINNED_BYTES:
            with torch.cuda.device(pefs.device):  # the event on the stream that copies (not cuda:0's)
                self.tensors = tuple(_pinned_copy(t) for t in tensors)
                self.event = torch.cuda.Event()
                self.event.record()
        else:
            self.tensors = tuple(t.cpu() for t in tensors)

    @property
    def in_flight(self) -> bool:
        """Whether the copy to the host may still be running (on CUDA, until ``result``)."""
        return self.event is not None

    def result(self) -> tuple[torch.Tensor, list[dict]]:
        """``(pefs on the CPU, metadata)`` as :func:`finish_batch` returns them, once the copy has arrived."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        pefs, probs, finite_logits, finite_pef, norms = self.tensors
        if self.rank is not None:
            pefs = reduce_rank(pefs, self.rank)
        rows, names = self.rows, self.task.outcome_names()
        finite_logits, finite_pef, norms = finite_logits.tolist(), finite_pef.tolist(), norms.tolist()
        meta = []
        for i in range(pefs.shape[0]):
            flag = None
            if not finite_logits[i]:
                flag = "nonfinite_logits"
            elif not finite_pef[i]:
                flag = "nonfinite_grad"
            elif norms[i] == 0:
                flag = "zero_pef"
            p = probs[i]
            pred = int(p.argmax()) if finite_logits[i] else -1
            m = {"index": self.lo + i, "text": rows["text"][i], "prediction": pred, "pef_norm": norms[i], "flag": flag}
            if self.text_tokens_cut is not None:  # tokens removed from the text's end to fit max_length (0: none)
                m["text_tokens_cut"] = int(self.text_tokens_cut[i])
            if names is not None:
                m["prediction_name"] = names[pred] if pred >= 0 else None
            if len(p) <= 64:
                m["probs"] = p.tolist()
            else:
                top = p.topk(min(self.top_k_probs, len(p)))
                m["topk_ids"] = top.indices.tolist()
                m["topk_probs"] = top.values.tolist()
            for col in ("label", "label_name", "target"):
                if col in rows:
                    m[col] = rows[col][i]
            meta.append(m)
        return pefs, meta


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of CUDA tensor ``t`` in pinned host memory (torch's caching host allocator), queued on the current
    stream without blocking the host: read it only after an event recorded behind it."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
