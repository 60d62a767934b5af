"""Exact token attributions of an example's loading on a component (the report's token highlighting).

An example's LRM-PEF ``G`` (r x n, row ``g_row = ∇θ (sqrt p_row) log p_row``) is stored projected, ``G A``
(``A``: the sparse projection of App. A, n x d; ``A = I`` for an unprojected store). Its *loading* on a
component ``h_j`` (d dims, unit norm) is the quadratic form the decomposition fits (§2.2),

    loading = h_jᵀ (G A)ᵀ (G A) h_j = Σ_rows c_row²,     c_row = (g_row A) · h_j = g_row · (A h_j).

The gradient of a hooked module's weight is a sum over the positions of its output, ``g_row = Σ_t g_row,t``
(``Linear``: ``g_row,t = δ_t a_tᵀ`` with ``δ_t = ∂ row / ∂y_t``, ``a_t`` the input), so ``c_row`` splits
exactly over tokens:

    c_row,t = g_row,t · (A h_j) = δ_tᵀ M a_t     (M: the back-projection A h_j reshaped to the weight),

``δ_t · m_b`` for a bias and ``δ_t · M[id_t]`` for an embedding
(:meth:`npeff_lens.pef.PEFComputer.token_contributions`: one forward and one backward per row, no
per-token projection). Token t's share of the loading is ``Σ_rows c_row c_row,t``; the parameters the hooks
do not cover (einsum weights of a ``HookedTransformer``, a weight tied across modules) and
hooked modules whose output has no token axis enter two labelled remainder terms, each exact:
``Σ_rows c_row · (g_row,rest · A h_j)``. Shares plus remainder sum to the loading. With SVD rank reduction
(App. C, ``G' = U_kᵀ G``) the rows are rotated by the same ``U_k`` first.

The loading is that of the *raw* projected rows the collector stores (NPEFF divides each PEF by its
Frobenius norm ``‖GᵀG‖_F`` at fit time, a per-example constant; shares as fractions of the loading are
unchanged by it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .analysis import active, top_examples
from .io import progress as bar
from .models import load_model
from .pef import PEFComputer
from .perturb import check_adapter
from .projection import Projection, projection_from_config
from .rundir import load_run
from .tasks import task_from_config

__all__ = ["TokenAttribution", "TokenAttributor", "attribute_tokens", "stored_loadings"]

REMAINDER_LABELS = {
    "fallback": "parameters outside the module hooks",
    "untokenised": "hooked modules without a token axis",
}


@dataclass
class TokenAttribution:
    """One example's loading on one component, split over its prompt's tokens (padding removed)."""

    example: int
    component: int
    token_ids: list[int]
    tokens: list[str]
    shares: torch.Tensor  # "t" float64: Σ_rows c_row c_row,t
    remainder: dict[str, float]  # label -> Σ_rows c_row c_row,rest (REMAINDER_LABELS)
    row_terms: torch.Tensor  # "r" float64: c_row = (G_row A) · h_j
    log_probs: torch.Tensor = field(repr=False)  # "outcomes"

    @property
    def loading(self) -> float:
        """``Σ_rows c_row²`` (= shares + remainder)."""
        return float(self.row_terms.square().sum())

    def fractions(self) -> list[float]:
        """Shares as fractions of the loading (0 when the loading is 0)."""
        total = self.loading
        return [float(v) / total if total > 0 else 0.0 for v in self.shares]


def stored_loadings(pefs: torch.Tensor, component: torch.Tensor) -> torch.Tensor:
    """``Σ_rows ((G_row) · h)²`` per example, "example rank dim", "dim" -> "example" (float64)."""
    pefs = torch.as_tensor(pefs).double()
    if pefs.ndim == 2:
        pefs = pefs[:, None]
    return (pefs @ torch.as_tensor(component).double()).square().sum(-1)


def _rank_rotation(raw: torch.Tensor, rank: int) -> torch.Tensor:
    """``U_k`` "b r k" of :func:`npeff_lens.pef.reduce_rank` (zero columns pad k > r)."""
    b, r, _ = raw.shape
    gram = raw.double() @ raw.double().transpose(1, 2)
    _, evecs = torch.linalg.eigh(gram)
    k = min(rank, r)
    U = evecs[:, :, -k:].flip(-1)
    if k < rank:
        U = torch.cat([U, U.new_zeros(b, r, rank - k)], dim=2)
    return U


class TokenAttributor:
    """Token attributions for a decomposition's components, on the model and task its PEFs came from.

    ``components``: "component dim" (``NPEFF.components_``); ``layout`` / ``projection`` (a manifest's
    projection config, a :class:`~npeff_lens.projection.Projection` or ``None``) / ``max_length`` / ``rank``: as
    collected.
    """

    def __init__(
        self,
        adapter,
        task,
        layout: Sequence[Mapping[str, Any]],
        projection: Projection | Mapping[str, Any] | None,
        components,
        *,
        max_length=None,
        rank=None,
    ):
        check_adapter(adapter, layout)
        params = dict(adapter.all_named_parameters())
        named = [(e["name"], params[e["name"]]) for e in layout]
        if isinstance(projection, Mapping):
            projection = projection_from_config(projection)
        adapter.eval()
        self.adapter, self.task = adapter, task.bind(adapter)
        self.computer = PEFComputer(adapter, self.task, named, projection)
        self.components = torch.as_tensor(components).float()
        if self.components.shape[1] != self.computer.dim:
            raise ValueError(f"components have {self.components.shape[1]} dims; the PEFs have {self.computer.dim}")
        self.max_length, self.rank = max_length, rank

    @classmethod
    def from_manifest(cls, manifest: dict, components, adapter=None) -> TokenAttributor:
        """From a PEF store's manifest (``NPEFF.manifest_``): loads the model by name unless ``adapter``."""
        for key in ("layout", "task", "model"):
            if not manifest.get(key):
                raise ValueError(f"the manifest records no {key!r}; was the decomposition fitted on a PEF store?")
        if adapter is None:
            model = manifest["model"]
            adapter = load_model(model["name"], backend=model.get("backend") or "hf")
        cfg = manifest.get("config") or {}
        rank = cfg.get("rank")
        return cls(
            adapter,
            task_from_config(manifest["task"]),
            manifest["layout"],
            manifest.get("projection"),
            components,
            max_length=cfg.get("max_length"),
            rank=None if rank is None or rank >= int(manifest.get("pef_rows") or rank) else int(rank),
        )

    def attribute(
        self, component: int, examples: Sequence[int], texts: Sequence[str], batch_size: int = 8
    ) -> list[TokenAttribution]:
        """Attributions of ``examples`` (store indices; ``texts`` their texts, unformatted) on ``component``."""
        return self.attribute_pairs([(component, i) for i in examples], texts, batch_size=batch_size)

    def attribute_pairs(
        self, pairs: Sequence[tuple[int, int]], texts: Sequence[str], batch_size: int = 8, progress: bool = False
    ) -> list[TokenAttribution]:
        """Attributions of (component, example) pairs, in their order (``texts[n]``: pair n's text). Batches
        hold prompts of similar length (little padding), each example split along its own component. A text too
        long for ``max_length`` is shortened as its collection shortened it
        (:meth:`~npeff_lens.tasks.Task.fitted_prompts`)."""
        prompts, _ = self.task.fitted_prompts(self.adapter.tokenizer, list(texts), self.max_length)
        lengths = [len(ids) for ids in self.adapter.tokenizer(prompts)["input_ids"]]
        order = sorted(range(len(pairs)), key=lambda n: lengths[n])
        out: list[TokenAttribution | None] = [None] * len(pairs)
        for lo in bar(range(0, len(order), batch_size), desc="token attributions", unit="batch", enabled=progress):
            chunk = order[lo : lo + batch_size]
            for n, att in zip(chunk, self._batch([pairs[n] for n in chunk], [prompts[n] for n in chunk])):
                out[n] = att
        return out

    def _batch(self, pairs, prompts) -> list[TokenAttribution]:
        comps = sorted({j for j, _ in pairs})
        assign = [comps.index(j) for j, _ in pairs]
        res = self.computer.token_contributions(
            prompts, self.components[comps], assign=assign, max_length=self.max_length
        )
        tokens, rest = res["tokens"][:, 0].double(), {k: res[k][:, 0].double() for k in REMAINDER_LABELS}
        if self.rank is not None:  # App. C: the stored rows are U_kᵀ G; rotate every term the same way
            raw, _ = self.computer.compute(prompts, max_length=self.max_length)
            U = _rank_rotation(raw, self.rank)
            tokens = torch.einsum("brk,brt->bkt", U, tokens)
            rest = {k: torch.einsum("brk,br->bk", U, v) for k, v in rest.items()}
        tok = self.adapter.tokenizer
        out = []
        for i, (component, ex) in enumerate(pairs):
            keep = res["attention_mask"][i].bool()
            c_rt = tokens[i][:, keep]  # "r t"
            c_row = c_rt.sum(1) + sum(v[i] for v in rest.values())
            ids = res["input_ids"][i][keep].tolist()
            out.append(
                TokenAttribution(
                    example=int(ex),
                    component=int(component),
                    token_ids=ids,
                    tokens=[tok.decode([t]) for t in ids],
                    shares=c_row @ c_rt,
                    remainder={k: float(c_row @ v[i]) for k, v in rest.items()},
                    row_terms=c_row,
                    log_probs=res["log_probs"][i],
                )
            )
        return out


def attribute_tokens(
    decomposition_dir, component: int, examples: Sequence[int] | None = None, *, store=None, adapter=None, k: int = 8
) -> list[TokenAttribution]:
    """Attributions of ``examples`` (default: the top ``k`` by coefficient, active ones only) on ``component`` of
    a saved run."""
    est, store = load_run(decomposition_dir, store)
    if examples is None:
        coeffs = est.coefficients_
        on = active(coeffs)
        examples = [int(i) for i in top_examples(coeffs, k=k)[component] if on[i, component]]
    texts = store.metadata.select(list(examples))["text"]
    return TokenAttributor.from_manifest(est.manifest_, est.components_, adapter).attribute(component, examples, texts)
