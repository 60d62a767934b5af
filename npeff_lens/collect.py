"""PEF collection (§2.1): per-example LRM-PEF rows, projected block by block as they are produced.

For each batch the task gives ``rows`` ``[batch, r]`` (``stop_grad(sqrt p_i) log p_i``, or the r'
expectation-projection rows, or any per-example scalars). Row j's per-example gradient is the LRM-PEF
row ``G[:, j]``. It is computed exactly, without materialising per-example gradients of the whole model:

- one forward; forward hooks record each hooked module's input ``a`` and output ``y``;
- per row j, one backward pass for the batch asks autograd for ``dL/dy`` of the hooked outputs only
  (no weight gradient is formed);
- per hooked parameter, the per-example gradient is rebuilt from ``(a, dL/dy)``
  (``Linear``: ``g[b]^T a[b]``; GPT-2 ``Conv1D``: ``a[b]^T g[b]``; ``Embedding``: scatter of ``g[b]``; a
  normalisation layer's weight or bias: ``Σ_t dL/dy_t ⊙ x̂_t`` with ``x̂ = y(p=1) - y(p=0)`` re-evaluated from
  the recorded input), for a bounded chunk of examples and rows, and projected immediately with
  ``SparseProjection.project(block, offset)`` into the ``[batch, r, d]`` accumulator (the projection is linear
  and separable over the flat index, so each contribution is added as soon as it exists);
- with a ``KroneckerProjection``, weight matrices are never rebuilt: ``Σ_t (P_R δ_t)(P_C a_t)ᵀ`` goes into a
  ``[batch, r, sketch_dim]`` accumulator, which is projected once per batch by the second (sparse) stage;
- parameters owned by other modules (HookedTransformer's einsum weights, a weight used outside its module)
  fall back to one ``autograd.grad`` per example and row: exact, slower. The first batch's self-check
  compares every hooked parameter with autograd and moves any it gets wrong to the fallback.

Peak memory: the model, the batch's activations (as for any backward), r x the hooked outputs'
gradients for one row group, and one chunk of per-example gradients of at most ``chunk_elems`` floats.
It does *not* grow with batch x rows x number of parameters.

Each batch is then finished on its device (non-finite examples zeroed and flagged, norms) and copied to the host
once, where the rank reduction and the metadata follow. On CUDA the copy goes to pinned memory behind an event,
and a single-process collection writes the batch to the store after queueing the next one, so the store's write
overlaps the device's work (under torchrun each round's batches are gathered, then written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from . import distributed
from .config import CollectConfig
from .data import align_labels, load_dataset
from .io import DeferredSignals, progress, read_json
from .models import ModelAdapter, adapt, parameter_layout
from .projection import KroneckerProjection, SparseProjection, start_numba_threads
from .tasks import Task, shortened_note

CHUNK_ELEMS = 1 << 25  # per-example-gradient floats materialised at once (128 MiB in fp32)


def _conv1d_cls():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # pragma: no cover
        return ()


@dataclass
class _Slot:
    """A selected parameter: where it lives in the flat layout and how its gradient is rebuilt."""

    name: str
    param: nn.Parameter
    offset: int
    kind: str  # "linear_w", "linear_b", "conv1d_w", "conv1d_b", "embedding", "norm", "fallback"
    module: nn.Module | None = None  # the owner ("norm": its output is re-evaluated with the parameter at 0 and 1)
    pname: str | None = None


class PEFComputer:
    """Computes projected LRM-PEFs ``[batch, r, d]`` for batches of prompts (see the module docstring).

    ``projection=None`` returns unprojected rows ``[batch, r, n_params]`` (tiny models, tests).
    ``engine``: ``"hooks"`` (per-example gradients from module hooks, fallback for the rest) or
    ``"loop"`` (one ``autograd.grad`` per example and row for everything: the reference).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        task: Task,
        named_params,
        projection: SparseProjection | KroneckerProjection | None,
        engine: str = "hooks",
        chunk_elems: int = CHUNK_ELEMS,
    ):
        if engine not in ("hooks", "loop"):
            raise ValueError(f"engine must be 'hooks' or 'loop', got {engine!r}")
        self.adapter, self.task, self.projection = adapter, task, projection
        self.layout = parameter_layout(named_params)
        self.n_params = sum(e["numel"] for e in self.layout)
        if projection is not None and projection.n_in != self.n_params:
            raise ValueError(f"projection n_in={projection.n_in} != number of selected parameters {self.n_params}")
        if isinstance(projection, KroneckerProjection) and projection.shapes != [
            tuple(e["shape"]) for e in self.layout
        ]:
            raise ValueError("the Kronecker projection was built for other parameter shapes than those selected")
        self.dim = projection.n_out if projection is not None else self.n_params
        # the accumulator: projected rows, or (Kronecker) the first-stage sketch, projected once per batch
        self.kron = isinstance(projection, KroneckerProjection)
        self.acc_dim = projection.sketch_dim if self.kron else self.dim
        self.chunk_elems = chunk_elems
        self.params = [p for _, p in named_params]
        slots = {}
        for (name, p), entry in zip(named_params, self.layout):
            slots[id(p)] = _Slot(name, p, entry["offset"], "fallback")
        # owning modules of each selected parameter (a tied parameter may have several)
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        for mod in adapter.module.modules():
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in slots:
                    owners.setdefault(id(p), []).append((mod, pname))
        conv1d = _conv1d_cls()
        # TransformerBridge's normalisation bridges compute the norm themselves from their original
        # component's parameters: the bridge, not the owner, is the module whose output to hook
        wrappers = {
            id(m.original_component): m
            for m in adapter.module.modules()
            if isinstance(getattr(m, "original_component", None), nn.Module)
        }
        self.hooked_modules: dict[nn.Module, list[_Slot]] = {}
        for pid, slot in slots.items():
            mods = owners.get(pid, [])
            kinds = []
            for mod, pname in mods:
                if isinstance(mod, nn.Linear):
                    kinds.append("linear_w" if pname == "weight" else "linear_b")
                elif conv1d and isinstance(mod, conv1d):
                    kinds.append("conv1d_w" if pname == "weight" else "conv1d_b")
                elif isinstance(mod, nn.Embedding) and pname == "weight":
                    kinds.append("embedding")
                elif _is_norm(mod, slot.param) and len(mods) == 1:
                    kinds.append("norm")
                    slot.module, slot.pname = mod, pname
                    wrapper = wrappers.get(id(mod))
                    if wrapper is not None and "norm" in type(wrapper).__name__.lower():
                        slot.module, slot.pname = wrapper, f"original_component.{pname}"
                else:
                    kinds.append(None)
            if engine == "hooks" and mods and None not in kinds and len(set(kinds)) == 1:
                slot.kind = kinds[0]
                for mod, _ in mods if slot.module is None else [(slot.module, slot.pname)]:
                    self.hooked_modules.setdefault(mod, []).append(slot)
        self.fallback = [s for s in slots.values() if s.kind == "fallback"]
        self._records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.checked = False
        self.demoted: list[str] = []

    def self_check(self, prompt: str, max_length: int | None = None, rtol: float = 1e-3) -> list[str]:
        """Compare the hooks' per-example gradients with plain autograd on one example, and move any
        parameter whose gradient the hooks miss (a wrapper that calls ``F.linear`` on a module's
        weight instead of the module, a weight also used outside its module) to the exact fallback.
        Returns the names moved. Costs two backward passes."""
        self.checked = True
        if not self.hooked_modules:
            return []
        batch = self.adapter.tokenize([prompt], max_length=max_length)
        with self._only_selected_require_grad(), self._recording(), torch.enable_grad():
            log_probs = self.task.log_probs(self.adapter, batch)
            if not torch.isfinite(log_probs).all():
                return []
            scalar = self.task.pef_rows(log_probs).sum()
            records, self._records = self._records, []
            slots = [s for ss in self.hooked_modules.values() for s in ss]
            slots = list({id(s): s for s in slots}.values())
            ref = torch.autograd.grad(scalar, [s.param for s in slots], retain_graph=True, allow_unused=True)
            outs = torch.autograd.grad(scalar, [y for _, _, y in records], allow_unused=True) if records else []
        got = {id(s): torch.zeros(s.param.numel(), device=s.param.device) for s in slots}
        for (mod, a, _), g in zip(records, outs):
            if g is not None:
                for slot in self.hooked_modules[mod]:
                    got[id(slot)] += self._per_example(slot, a, g[None])[0, 0].float()
        bad = []
        for slot, r in zip(slots, ref):
            r = torch.zeros_like(got[id(slot)]) if r is None else r.reshape(-1).float()
            if (got[id(slot)] - r).norm() > rtol * r.norm() + 1e-12:
                bad.append(slot)
        self._demote(bad, "are not reachable through module hooks in this model")
        return [s.name for s in bad]

    def _demote(self, slots, why: str) -> None:
        """Move slots to the exact per-example autograd fallback."""
        if not slots:
            return
        for slot in slots:
            slot.kind = "fallback"
            self.fallback.append(slot)
            for mod in list(self.hooked_modules):
                self.hooked_modules[mod] = [s for s in self.hooked_modules[mod] if s is not slot]
                if not self.hooked_modules[mod]:
                    del self.hooked_modules[mod]
        names = [s.name for s in slots]
        self.demoted += names
        import warnings

        warnings.warn(
            f"{len(names)} parameter(s) {why} (e.g. {names[:3]}); their per-example gradients use the "
            "exact but slower per-example autograd fallback",
            stacklevel=3,
        )

    # --- forward hooks -----------------------------------------------------------------------
    def _hook(self, module, inputs, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            self._records.append((module, inputs[0].detach(), output))

    @contextlib.contextmanager
    def _recording(self):
        handles = [m.register_forward_hook(self._hook) for m in self.hooked_modules]
        self._records = []
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _only_selected_require_grad(self):
        # Backward then stops at the earliest selected parameter instead of crossing the whole model.
        selected = {id(p) for p in self.params}
        saved = [(p, p.requires_grad) for p in self.adapter.module.parameters()]
        try:
            for p, _ in saved:
                p.requires_grad_(id(p) in selected)
            yield
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)

    # --- per-example gradients -> projected accumulator ------------------------------------------
    def _add(self, acc, rows_idx: slice, slot: _Slot, block: torch.Tensor):
        """acc[:, rows_idx] += projection of block ``[b, R, numel]`` at the slot's offset (a slice of rows: views
        and in-place adds only, no index tensor to send to the device)."""
        b, R, numel = block.shape
        if self.projection is None:
            acc[:, rows_idx, slot.offset : slot.offset + numel] += block.float()
        elif self.kron:
            for mid, piece in self.projection.sketch(block, slot.offset):
                acc[:, rows_idx, mid : mid + piece.shape[-1]] += piece
        else:
            acc[:, rows_idx] += self.projection.project(block.reshape(b * R, numel), offset=slot.offset).reshape(
                b, R, -1
            )

    def _per_example(self, slot, a, g):
        """Per-example gradient ``[b, R, numel]`` of one slot from inputs a ``[b, ..., in]`` and
        output gradients g ``[R, b, ..., out]``."""
        g = rearrange(g, "r b ... o -> b r (...) o")  # positions (if any) on one axis
        if slot.kind in ("linear_w", "conv1d_w"):
            a = rearrange(a, "b ... i -> b (...) i").to(g.dtype)
            eq = "brto,bti->broi" if slot.kind == "linear_w" else "brto,bti->brio"
            return rearrange(torch.einsum(eq, g, a), "b r x y -> b r (x y)")
        if slot.kind in ("linear_b", "conv1d_b"):
            return g.sum(2)
        if slot.kind == "norm":
            return torch.einsum("brto,bto->bro", g, rearrange(_norm_basis(slot, a), "b ... o -> b (...) o").to(g.dtype))
        if slot.kind == "embedding":
            (b, R, T, D), V = g.shape, slot.param.shape[0]
            ids = rearrange(a, "b ... -> b (...)")
            out = torch.zeros(b, R, V, D, dtype=g.dtype, device=g.device)
            out.scatter_add_(2, ids[:, None, :, None].expand(b, R, T, D), g)
            return rearrange(out, "b r v d -> b r (v d)")
        raise AssertionError(slot.kind)

    def compute(self, prompts: Sequence[str], max_length: int | None = None):
        """``(pefs [b, r, d] fp32, log_probs [b, outcomes] fp32)`` for a batch of prompts."""
        adapter, task = self.adapter, self.task
        if not self.checked:
            self.self_check(prompts[0], max_length=max_length)
        batch = adapter.tokenize(prompts, max_length=max_length)
        b = batch["input_ids"].shape[0]
        with self._only_selected_require_grad(), self._recording(), torch.enable_grad():
            log_probs = task.log_probs(adapter, batch)
            bad = ~torch.isfinite(log_probs).all(-1)
            n_bad = int(bad.sum())  # the batch's one host synchronisation before its PEFs are done
            # An example with non-finite logits gets constant rows: it contributes nothing, the others
            # are unaffected (examples never mix), and the caller flags it and stores zeros.
            safe = torch.where(bad[:, None], torch.zeros_like(log_probs).detach(), log_probs) if n_bad else log_probs
            rows = task.pef_rows(safe)  # [b, r]
            R = rows.shape[1]
            acc = torch.zeros(b, R, self.acc_dim, dtype=torch.float32, device=adapter.device)
            if n_bad == b:
                return acc.new_zeros(b, R, self.dim), log_probs.detach()
            records = self._records
            self._records = []
            # A module whose output is not batch-major (e.g. position embeddings computed once for
            # the whole batch, [1, T, D]) mixes examples in its output gradient: use the fallback.
            mixed = [rec for rec in records if rec[2].ndim < 2 or rec[2].shape[0] != b]
            if mixed:
                self._demote(
                    list({id(s): s for _m, _a, _y in mixed for s in self.hooked_modules.get(_m, [])}.values()),
                    "have outputs shared across the batch",
                )
                records = [rec for rec in records if rec[0] in self.hooked_modules]
            outputs = [y for _, _, y in records]
            # rows in groups whose output gradients fit the chunk budget
            act = sum(y.numel() for y in outputs) or 1
            group = max(1, min(R, self.chunk_elems // act))
            for r0 in range(0, R, group):
                ridx = slice(r0, min(R, r0 + group))
                grads = []  # per row: list over records of dL/dy
                for j in range(ridx.start, ridx.stop):
                    if outputs:
                        gj = torch.autograd.grad(rows[:, j].sum(), outputs, retain_graph=True, allow_unused=True)
                    else:
                        gj = []
                    grads.append(gj)
                for k, (mod, a, _y) in enumerate(records):
                    gs = [gj[k] for gj in grads]
                    if any(g is None for g in gs):
                        continue
                    g = torch.stack(gs)  # [R', b, ..., out]
                    for slot in self.hooked_modules[mod]:
                        if self.kron and slot.kind in _FACTORED:
                            self._add_sketch(acc, ridx, slot, a, g)
                            continue
                        numel = slot.param.numel()
                        step = max(1, self.chunk_elems // max(1, numel * len(grads)))
                        for b0 in range(0, b, step):
                            sl = slice(b0, b0 + step)
                            self._add(acc[sl], ridx, slot, self._per_example(slot, a[sl], g[:, sl]))
                del grads
            if self.fallback:
                fparams = [s.param for s in self.fallback]
                for i in range(b):
                    for j in range(R):
                        gs = torch.autograd.grad(rows[i, j], fparams, retain_graph=True, allow_unused=True)
                        for slot, gp in zip(self.fallback, gs):
                            if gp is not None:
                                self._add(acc[i : i + 1], slice(j, j + 1), slot, gp.reshape(1, 1, -1))
        if self.kron:  # the second stage, once for the batch
            acc = self.projection.inner.project(acc.reshape(b * R, -1)).reshape(b, R, self.dim)
        return acc, log_probs.detach()

    def _add_sketch(self, acc, rows_idx: slice, slot: _Slot, a, g):
        """Kronecker projection: add the first-stage sketch of the slot's per-example gradient, from its factors
        (``Σ_t (P_R δ_t)(P_C a_t)ᵀ``), without forming it. a ``[b, ..., in]``, g ``[R', b, ..., out]``."""
        proj = self.projection
        i = proj.index_of(slot.offset)
        g = rearrange(g, "r b ... o -> b r (...) o")
        if slot.kind == "embedding":
            sk = proj.sketch_rows(i, rearrange(a, "b ... -> b (...)"), g)
        else:
            a = rearrange(a, "b ... i -> b (...) i")[:, None]
            sk = proj.sketch_outer(i, g, a) if slot.kind == "linear_w" else proj.sketch_outer(i, a, g)
        mid = proj.sketch_offsets[i]
        acc[:, rows_idx, mid : mid + sk.shape[-1]] += sk

    # --- exact token attributions (the report) ----------------------------------------------------
    def token_contributions(
        self,
        prompts: Sequence[str],
        directions: torch.Tensor,
        assign: Sequence[int] | None = None,
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Exact split over token positions of ``G_row · h_k`` (the LRM-PEF row projected, then dotted with a
        PEF-space vector ``h_k``) for each example, row and vector, without any per-token projection.

        A hooked slot's per-example gradient is a sum over its output's positions, ``g = Σ_t g_t`` (``Linear``:
        ``g_t = δ_t a_tᵀ``), so ``(g A) · h = Σ_t g_t · (A h)``: per position the bilinear form ``δ_tᵀ M a_t`` with
        ``M`` the slot's block of the back-projection ``A h`` (``projection.adjoint``; ``A = I`` unprojected), a
        bias term ``δ_t · m_b``, an embedding term ``δ_t · M[id_t]``. Fallback slots enter whole (their
        per-example gradient · ``A h``). One forward and one backward per row for the batch; back-projection
        blocks exist one slot at a time (all fallback slots' at once).

        ``directions``: ``"k dim"``; ``assign`` (optional, one index per prompt): split each example along its
        own direction only (then k = 1 in the outputs). Returns fp32 tensors: ``tokens`` ``"b k r t"`` (t: the
        input's positions, padding included), ``untokenised`` ``"b k r"`` (hooked modules whose output has no
        axis aligned with the input's positions, e.g. a classifier head), ``fallback`` ``"b k r"``, and
        ``input_ids`` / ``attention_mask`` ``"b t"``, ``log_probs`` ``"b outcomes"``. The three terms sum to
        ``G_row · h_k`` for the rows :meth:`compute` returns (before any rank reduction).
        """
        adapter, task = self.adapter, self.task
        directions = torch.as_tensor(directions, dtype=torch.float32, device=adapter.device)
        if directions.ndim != 2 or directions.shape[1] != self.dim:
            raise ValueError(f"directions must be [k, {self.dim}], got {tuple(directions.shape)}")
        pick = None if assign is None else torch.as_tensor(list(assign), dtype=torch.long, device=adapter.device)
        if pick is not None and pick.shape != (len(prompts),):
            raise ValueError(f"assign needs one direction index per prompt ({len(prompts)}), got {len(pick)}")
        if not self.checked:
            self.self_check(prompts[0], max_length=max_length)
        batch = adapter.tokenize(prompts, max_length=max_length)
        (b, T), K = batch["input_ids"].shape, directions.shape[0] if pick is None else 1
        with self._only_selected_require_grad(), self._recording(), torch.enable_grad():
            log_probs = task.log_probs(adapter, batch)
            rows = task.pef_rows(log_probs)  # [b, r]
            R = rows.shape[1]
            out = {
                "tokens": torch.zeros(b, K, R, T),
                "untokenised": torch.zeros(b, K, R),
                "fallback": torch.zeros(b, K, R),
            }
            records, self._records = self._records, []
            mixed = [rec for rec in records if rec[2].ndim < 2 or rec[2].shape[0] != b]
            if mixed:  # as in compute: outputs shared across the batch go to the exact fallback
                self._demote(
                    list({id(s): s for _m, _a, _y in mixed for s in self.hooked_modules.get(_m, [])}.values()),
                    "have outputs shared across the batch",
                )
                records = [rec for rec in records if rec[0] in self.hooked_modules]
            outputs = [y for _, _, y in records]
            group = max(1, min(R, self.chunk_elems // (sum(y.numel() for y in outputs) or 1)))
            for r0 in range(0, R, group):  # rows in groups whose output gradients fit the chunk budget
                ridx = list(range(r0, min(R, r0 + group)))
                grads = [
                    torch.autograd.grad(rows[:, j].sum(), outputs, retain_graph=True, allow_unused=True)
                    for j in (ridx if outputs else [])
                ]
                for k, (mod, a, _y) in enumerate(records):
                    for slot in self.hooked_modules[mod]:
                        m = self._back_projection(slot, directions)
                        for gi, j in zip(grads, ridx):
                            if gi[k] is None:
                                continue
                            g = rearrange(gi[k].float(), "b ... o -> b (...) o")
                            terms = self._token_terms(slot, a, g, m, pick)  # [b, k, positions]
                            if terms.shape[-1] == T:
                                out["tokens"][:, :, j] += terms.cpu()
                            else:
                                out["untokenised"][:, :, j] += terms.sum(-1).cpu()
                del grads
            if self.fallback:
                fparams = [s.param for s in self.fallback]
                blocks = [self._back_projection(s, directions) for s in self.fallback]
                for i in range(b):
                    for j in range(R):
                        gs = torch.autograd.grad(rows[i, j], fparams, retain_graph=True, allow_unused=True)
                        for m, gp in zip(blocks, gs):
                            if gp is not None:
                                m = m if pick is None else m[pick[i] : pick[i] + 1]
                                out["fallback"][i, :, j] += (m @ gp.reshape(-1).float()).cpu()
        out.update(
            input_ids=batch["input_ids"].cpu(),
            attention_mask=batch["attention_mask"].cpu(),
            log_probs=log_probs.detach().float().cpu(),
        )
        return out

    def _back_projection(self, slot: _Slot, directions: torch.Tensor) -> torch.Tensor:
        """The slot's block of ``A h`` for each direction, ``"k numel"`` (``A = I`` without a projection)."""
        n = slot.param.numel()
        if self.projection is None:
            return directions[:, slot.offset : slot.offset + n]
        return self.projection.adjoint(directions, offset=slot.offset, length=n)

    @staticmethod
    def _token_terms(slot: _Slot, a: torch.Tensor, g: torch.Tensor, m: torch.Tensor, pick) -> torch.Tensor:
        """``"b k p"``: per output position p, the slot's per-position gradient · its back-projection block
        ``m`` ``"k numel"`` (with ``pick`` ``"b"``: example b's own direction ``m[pick[b]]`` only, k = 1);
        a ``[b, ..., in]`` inputs, g ``[b, p, out]`` output gradients."""
        shape = slot.param.shape
        m = m.reshape(-1, *shape) if pick is None else m[pick].reshape(-1, *shape)  # "k ..." or "b ..."
        if slot.kind == "embedding":
            ids = rearrange(a, "b ... -> b (...)")
            if pick is not None:
                rows = m[torch.arange(len(ids), device=ids.device)[:, None], ids]  # [b, p, dim]
                return torch.einsum("bpd,bpd->bp", g, rows)[:, None]
            return torch.einsum("bpd,kbpd->bkp", g, m[:, ids])
        if slot.kind in ("linear_b", "conv1d_b"):
            return torch.einsum("bpo,bo->bp", g, m)[:, None] if pick is not None else torch.einsum("bpo,ko->bkp", g, m)
        if slot.kind == "norm":
            g = g * rearrange(_norm_basis(slot, a), "b ... o -> b (...) o").float()
            return torch.einsum("bpo,bo->bp", g, m)[:, None] if pick is not None else torch.einsum("bpo,ko->bkp", g, m)
        a = rearrange(a, "b ... i -> b (...) i").float()
        w = "oi" if slot.kind == "linear_w" else "io"  # Linear weight [out, in]: δ_tᵀ M a_t; GPT-2 Conv1D [in, out]
        if pick is not None:
            return (torch.einsum(f"bpo,b{w}->bpi", g, m) * a).sum(-1)[:, None]
        return (torch.einsum(f"bpo,k{w}->bkpi", g, m) * a[:, None]).sum(-1)


_FACTORED = ("linear_w", "conv1d_w", "embedding")  # kinds whose per-example gradient is a sum of outer products


def _is_norm(module: nn.Module, param: nn.Parameter) -> bool:
    """A normalisation layer's elementwise weight or bias (LayerNorm, RMSNorm and their HF / TransformerLens
    variants): per-example gradients come from :func:`_norm_basis`; the first-batch self-check verifies it."""
    return param.ndim == 1 and "norm" in type(module).__name__.lower()


def _norm_basis(slot: _Slot, a: torch.Tensor) -> torch.Tensor:
    """``∂y/∂p`` per position for an elementwise-affine parameter p of a norm layer: ``y(p=1) - y(p=0)`` (the
    normalised input x̂ for a weight, whatever the layer's form, e.g. Gemma's ``x̂ (1 + w)``; ones for a bias).
    Then the per-example gradient is ``Σ_t dL/dy_t ⊙ x̂_t``."""
    p = slot.param
    with torch.no_grad():
        ones = torch.func.functional_call(slot.module, {slot.pname: torch.ones_like(p)}, (a,))
        zeros = torch.func.functional_call(slot.module, {slot.pname: torch.zeros_like(p)}, (a,))
    return ones - zeros


def pef_frobenius_norms(pefs: torch.Tensor) -> torch.Tensor:
    """``||G^T G||_F = ||G G^T||_F`` per example, from the r x r Gram."""
    gram = pefs @ pefs.transpose(1, 2)
    return gram.flatten(1).norm(dim=1)


def reduce_rank(pefs: torch.Tensor, rank: int) -> torch.Tensor:
    """App. C: keep the top-``rank`` right singular directions, ``G' = Σ_k V_k^T = U_k^T G``
    (from the r x r Gram, so no d x d matrix). Pads with zero rows when r < rank."""
    b, r, d = pefs.shape
    gram = pefs.double() @ pefs.double().transpose(1, 2)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    k = min(rank, r)
    U = evecs[:, :, -k:].flip(-1)  # [b, r, k] top-k
    out = (U.transpose(1, 2) @ pefs.double()).to(pefs.dtype)
    if k < rank:
        out = torch.cat([out, out.new_zeros(b, rank - k, d)], dim=1)
    return out


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
        dataset, rows = load_dataset(dataset, split=cfg.split, seed=cfg.data_seed, columns=columns,
                                     label_names=names, return_rows=True)  # fmt: skip
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


def make_projection(cfg: CollectConfig, layout: list[dict]) -> SparseProjection | KroneckerProjection | None:
    """The projection a collection configuration names, over the parameters of ``layout``."""
    if not cfg.proj_dim:
        return None
    if cfg.projection == "kron":
        shapes = [e["shape"] for e in layout]
        return KroneckerProjection(shapes, cfg.proj_dim, seed=cfg.seed, k=cfg.kron_k, density=cfg.density)
    return SparseProjection(sum(e["numel"] for e in layout), cfg.proj_dim, seed=cfg.seed, density=cfg.density)


def collect_pefs(model, dataset, task: Task, out, *, config: CollectConfig | None = None, tokenizer=None, **options):
    """Collect the (projected, optionally rank-reduced) LRM-PEFs of ``n`` examples into a ``PEFStore``.

    model: an adapter or any model ``npeff_lens.adapt`` accepts (``tokenizer`` for a bare HF model);
    dataset: a ``datasets.Dataset`` with a ``text`` column, a built-in dataset name or a local file
    (``split`` / ``data_seed`` apply), or a list of texts. ``options`` are the fields of
    :class:`~npeff_lens.config.CollectConfig` (``proj_dim``, ``density``, ``params``, ``n``, ...), or pass
    a ``config``. Rerunning the same call resumes where it stopped; another configuration into the same
    ``out`` is a ``StoreMismatchError`` naming the differing fields. Per example, the store also records the
    prediction, the probabilities (top-k for ``NextToken``), the PEF's Frobenius norm, a flag
    (``zero_pef``, ``nonfinite_logits``, ``nonfinite_grad``) for examples whose PEF is stored as zeros, and
    ``text_tokens_cut``: how many tokens were removed from the end of its text so that its prompt fits in
    ``max_length`` tokens (:meth:`~npeff_lens.tasks.Task.fitted_prompts`: the template is never cut; 0 when none).

    Inside a ``torch.distributed`` process group of several ranks (or with ``WORLD_SIZE`` > 1 set, as under
    ``torchrun``: the group is then initialised here), every rank calls this with the same arguments; the ranks
    share the examples and rank 0 writes the one store (:mod:`npeff_lens.distributed`). Rank 0 gets the
    store, the other ranks a read-only view of it (None if they cannot see its directory).

    SIGINT (Ctrl-C) or SIGTERM (``timeout``, a scheduler's preemption) stops a single-process collection after
    committing every example computed before it: :class:`Interrupted` (a ``KeyboardInterrupt``) says how many the
    store keeps, and rerunning the same call resumes after them. The store also commits by time (at least every
    ``npeff_lens.store.COMMIT_SECONDS``, 60 s), so even a SIGKILL loses little work.
    """
    from .store import PEFStore

    cfg = config or CollectConfig()
    if type(cfg) is not CollectConfig:  # a command: its inputs stay out of the store's resume key
        cfg = cfg.narrow(CollectConfig)
    cfg = cfg.replace(**options) if options else cfg
    adapter = model if isinstance(model, ModelAdapter) else adapt(model, tokenizer)
    adapter.eval()
    dataset, data_info, source_rows = _dataset_rows(dataset, cfg)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    task.bind(adapter)
    aligned = align_labels(dataset, task.outcome_names(), drop_invalid=cfg.drop_invalid,
                           source=f"the dataset {data_info['name']!r}", rows=source_rows)  # fmt: skip
    dataset = aligned.dataset
    if aligned.dropped and distributed.rank() == 0:
        rows_text = ", ".join(map(str, aligned.dropped[:8])) + (" ..." if len(aligned.dropped) > 8 else "")
        print(f"[npeff_lens] --drop-invalid: left out {len(aligned.dropped)} row(s) of {data_info['name']!r} "
              f"(rows {rows_text})", file=sys.stderr)  # fmt: skip
    if aligned.by_position and distributed.rank() == 0:
        mapping = ", ".join(f"{i} → {o!r}" for i, o in aligned.by_position.items())
        print(f"[npeff_lens] integer labels map to the task's outcomes by position: label {mapping} "
              "(--label-names maps them by name)", file=sys.stderr)  # fmt: skip
    n = len(dataset) if cfg.n is None else cfg.n
    if n > len(dataset):
        raise ValueError(f"n must be in [1, {len(dataset)}] (the dataset's size), got {n}")
    data_info["sha256"] = dataset_digest(dataset, n)
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
        store, flagged = distributed.collect(out, manifest, computer, dataset, task, cfg, n, rows=rows,
                                             dim=computer.dim, device=str(adapter.device), steps=steps)  # fmt: skip
    else:
        store = PEFStore.create(out, manifest, rows=rows, dim=computer.dim, dtype=cfg.dtype, shard_size=cfg.shard_size)
        _warn_if_resumed_from_right_truncation(store, cfg.max_length, n)
        try:
            flagged = _collect_into(store, computer, dataset, task, cfg, n, make_writer)
        finally:
            store.close()  # releases the writer lock; the store stays readable
    if flagged:
        print(
            f"[npeff_lens] {flagged} example(s) flagged (zero or non-finite PEF, stored as zeros); "
            "see the store's metadata 'flag' column",
            file=sys.stderr,
        )
    make_writer.say_shortened(cfg.max_length)
    if store is not None and distributed.rank() == 0:  # informational, not a progress bar: shown with --no-progress
        balance = class_balance(store)
        print(f"[npeff_lens] {len(store)} examples in {store.path}" + (f"; labels: {balance}" if balance else ""),
              file=sys.stderr)  # fmt: skip
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
        raise ValueError(
            f"unprojected PEFs (--proj-dim 0) of {n_params:,} parameters need ~{batch / 2**30:.1f} GiB per batch of "
            f"{cfg.batch_size} (and {store / 2**30:.1f} GiB of store), more than half of the "
            f"{available / 2**30:.1f} GiB available: project them (--proj-dim 8192), or select fewer parameters "
            "(--params)"
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
    from .projection import _HAVE_NUMBA

    if _HAVE_NUMBA:  # its sums never split across threads (one thread per output column): same bits
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def _plan(store, n: int, batch_size: int) -> list[tuple[int, int, bool]]:
    """The batches still to collect, ``(lo, hi, fill)``: the store's missing ranges (shards ``repair``
    removed; ``fill``) first, then ``[len(store), n)``, cut at the batch boundaries of an uninterrupted run
    (a batch is padded to its longest prompt, so other boundaries would change the bytes)."""
    plan = [(lo, min(b, lo + batch_size), True) for a, b in store.missing for lo in range(a, b, batch_size)]
    return plan + [(lo, min(n, lo + batch_size), False) for lo in range(len(store), n, batch_size)]


def _start_batch(computer: PEFComputer, dataset, task: Task, cfg: CollectConfig, lo: int, hi: int) -> _Finishing:
    """Examples ``[lo, hi)`` computed and on their way to the host: ``.result()`` is ``(pefs [b, rows, dim] on the
    CPU, metadata)``. On CUDA this returns once the host has queued the batch's work, before the device is done."""
    rows = dataset[lo:hi]
    prompts, cut = task.fitted_prompts(computer.adapter.tokenizer, rows["text"], cfg.max_length)
    pefs, log_probs = computer.compute(prompts, max_length=cfg.max_length)
    return _Finishing(pefs, log_probs, rows, lo, task, cfg.rank, cfg.top_k_probs, text_tokens_cut=cut)


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
            print(f"[npeff_lens] {note}; the store's metadata 'text_tokens_cut' column has the count per example",
                  file=sys.stderr)  # fmt: skip


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


def _collect_into(store, computer: PEFComputer, dataset, task: Task, cfg: CollectConfig, n: int,
                  make_writer=None) -> int:  # fmt: skip
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
    return _Finishing(pefs, log_probs, rows, lo, task, rank, top_k_probs, text_tokens_cut).result()


class _Finishing:
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
