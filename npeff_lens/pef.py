"""Computing each example's low-rank PEF from per-example gradients, projected block by block as they are produced.

The LRM-PEF is §2.1 of the paper.

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

Also here: the exact split of ``G_row · h`` over token positions (:meth:`PEFComputer.token_contributions`, the
report's attributions), the PEFs' Frobenius norms and App. C's rank reduction.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from .layout import parameter_layout
from .models import ModelAdapter
from .projection import KroneckerProjection, SparseProjection
from .tasks import Task

__all__ = ["CHUNK_ELEMS", "PEFComputer", "ParameterSlot", "pef_frobenius_norms", "reduce_rank"]

logger = logging.getLogger(__name__)

CHUNK_ELEMS = 1 << 25  # per-example-gradient floats materialised at once (128 MiB in fp32)


def _conv1d_cls():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # pragma: no cover
        return ()


@dataclass
class ParameterSlot:
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
            slots[id(p)] = ParameterSlot(name, p, entry["offset"], "fallback")
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
        self.hooked_modules: dict[nn.Module, list[ParameterSlot]] = {}
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
        if engine == "hooks" and self.fallback:
            names = [s.name for s in self.fallback]
            hint = (
                " (a HookedTransformer applies its weights in einsums; the same weights through backend 'hf' or "
                "'bridge' are hooked throughout)"
                if type(adapter.module).__name__ == "HookedTransformer"
                else ""
            )
            logger.info(
                f"{len(names)} selected parameter(s) are applied outside the modules whose per-example gradients "
                f"hooks give (Linear, Conv1D, Embedding, normalisation; e.g. {', '.join(names[:3])}): they take the "
                f"exact per-example autograd fallback, one backward pass per example and row{hint}"
            )
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
        with self.only_selected_require_grad(), self._recording(), torch.enable_grad():
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
                    got[id(slot)] += self.per_example(slot, a, g[None])[0, 0].float()
        bad = []
        for slot, r in zip(slots, ref):
            r = torch.zeros_like(got[id(slot)]) if r is None else r.reshape(-1).float()
            if (got[id(slot)] - r).norm() > rtol * r.norm() + 1e-12:
                bad.append(slot)
        self._demote(bad, "are not reachable through module hooks in this model")
        return [s.name for s in bad]

    def _demote(self, slots, why: str, stacklevel: int = 3) -> None:
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
        warnings.warn(
            f"{len(names)} parameter(s) {why} (e.g. {names[:3]}); their per-example gradients use the "
            "exact but slower per-example autograd fallback",
            stacklevel=stacklevel,
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
    def only_selected_require_grad(self):
        """While inside, only the selected parameters require gradients (as in :meth:`compute`), so that a
        backward stops at the earliest selected parameter instead of crossing the whole model."""
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
    def _add(self, acc, rows_idx: slice, slot: ParameterSlot, block: torch.Tensor):
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

    def per_example(self, slot: ParameterSlot, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-example gradient ``[b, R, numel]`` of one hooked slot from its module's inputs a ``[b, ..., in]`` and
        output gradients g ``[R, b, ..., out]`` (what :meth:`compute` projects, chunk by chunk)."""
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
        with self.only_selected_require_grad(), self._recording(), torch.enable_grad():
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
            records, groups = self._taken_records(b, R)
            outputs = [y for _, _, y in records]
            for js in groups:
                ridx = slice(js.start, js.stop)
                grads = self._output_grads(rows, js, outputs)
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
                            self._add(acc[sl], ridx, slot, self.per_example(slot, a[sl], g[:, sl]))
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

    def _taken_records(self, b: int, R: int) -> tuple[list, list[range]]:
        """The hooked modules' ``(module, input, output)`` records of the batch's forward (taken: the next forward
        records anew), and the groups of the R rows whose output gradients fit the chunk budget at once. A module
        whose output is not batch-major (e.g. position embeddings computed once for the whole batch, ``[1, T, D]``)
        mixes examples in its output gradient: its slots move to the exact fallback and its records are dropped."""
        records, self._records = self._records, []
        mixed = [rec for rec in records if rec[2].ndim < 2 or rec[2].shape[0] != b]
        if mixed:
            self._demote(
                list({id(s): s for _m, _a, _y in mixed for s in self.hooked_modules.get(_m, [])}.values()),
                "have outputs shared across the batch",
                stacklevel=4,
            )
            records = [rec for rec in records if rec[0] in self.hooked_modules]
        group = max(1, min(R, self.chunk_elems // (sum(y.numel() for _, _, y in records) or 1)))
        return records, [range(r0, min(R, r0 + group)) for r0 in range(0, R, group)]

    @staticmethod
    def _output_grads(rows: torch.Tensor, js: range, outputs: list[torch.Tensor]) -> list:
        """Per row j of ``js``: ``dL_j/dy`` of each hooked output (None where unused; no entries without outputs),
        ``L_j = Σ_b rows[b, j]``: one backward for the batch, whose examples never mix."""
        if not outputs:
            return [() for _ in js]
        return [torch.autograd.grad(rows[:, j].sum(), outputs, retain_graph=True, allow_unused=True) for j in js]

    def _add_sketch(self, acc, rows_idx: slice, slot: ParameterSlot, a, g):
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
        with self.only_selected_require_grad(), self._recording(), torch.enable_grad():
            log_probs = task.log_probs(adapter, batch)
            rows = task.pef_rows(log_probs)  # [b, r]
            R = rows.shape[1]
            out = {
                "tokens": torch.zeros(b, K, R, T),
                "untokenised": torch.zeros(b, K, R),
                "fallback": torch.zeros(b, K, R),
            }
            records, groups = self._taken_records(b, R)
            outputs = [y for _, _, y in records]
            for js in groups:
                grads = self._output_grads(rows, js, outputs)
                for k, (mod, a, _y) in enumerate(records):
                    for slot in self.hooked_modules[mod]:
                        m = self._back_projection(slot, directions)
                        for gi, j in zip(grads, js):
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

    def _back_projection(self, slot: ParameterSlot, directions: torch.Tensor) -> torch.Tensor:
        """The slot's block of ``A h`` for each direction, ``"k numel"`` (``A = I`` without a projection)."""
        n = slot.param.numel()
        if self.projection is None:
            return directions[:, slot.offset : slot.offset + n]
        return self.projection.adjoint(directions, offset=slot.offset, length=n)

    @staticmethod
    def _token_terms(slot: ParameterSlot, a: torch.Tensor, g: torch.Tensor, m: torch.Tensor, pick) -> torch.Tensor:
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


def _norm_basis(slot: ParameterSlot, a: torch.Tensor) -> torch.Tensor:
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
