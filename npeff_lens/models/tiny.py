"""Tiny randomly initialised models for tests: llama-like, GPT-2-like and a BERT classifier, with a
small byte-level BPE tokenizer trained offline on a fixed corpus (deterministic, no download)."""

from __future__ import annotations

import functools
import os

import torch

from ..assets import cache_dir

CORPUS = (
    "Review: a great and moving film . Sentiment: positive\n"
    "Review: a dull , lifeless and boring movie . Sentiment: negative\n"
    "Question: what is the capital of France ? Answer: Paris\n"
    "The country of Lisbon is Portugal . The genre of the film is comedy .\n"
    "yes no maybe good bad fun sad happy awful wonderful terrible brilliant the a of and to in is it\n"
) * 4

TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-bert-classifier")


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n"), trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` with a 384-token byte-level BPE vocabulary.

    It is saved once under the cache and loaded back with ``AutoTokenizer`` so that it carries a
    ``name_or_path`` (TransformerLens reloads tokenizers by that name)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = cache_dir() / "models" / "tiny-tokenizer"
    if not (d / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
            eos_token="<|endoftext|>",
            bos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token="<pad>",
        )
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        os.replace(tmp, d) if not d.exists() else None
    return AutoTokenizer.from_pretrained(d)


def tiny_config(arch: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    vocab = 384
    if arch == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
            architectures=["LlamaForCausalLM"],
        )
    if arch == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            n_ctx=128,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
            architectures=["GPT2LMHeadModel"],
        )
    if arch == "tiny-bert-classifier":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            num_labels=3,
            pad_token_id=1,
            architectures=["BertForSequenceClassification"],
        )
    raise ValueError(f"unknown tiny model {arch!r}; valid: {', '.join(TINY_MODELS)}")


def tiny_model(arch: str = "tiny-llama", seed: int = 0, dtype=torch.float32):
    """``(hf_model, tokenizer)``: a randomly initialised tiny model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = tiny_config(arch)
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if arch == "tiny-bert-classifier" else AutoModelForCausalLM
    model = cls.from_config(cfg).to(dtype).eval()
    model.config._name_or_path = arch
    return model, tiny_tokenizer()
