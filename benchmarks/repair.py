"""Repair cost: a 1,000-example store (tiny-llama, 10 shards of 100) with one middle shard damaged; `repair`
removes only that shard and rerunning the collection recollects only its examples. Prints the time of the
whole collection, of the recollection, and whether the repaired store equals the original byte for byte.

    python benchmarks/repair.py
"""

import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from npeff_lens.collect import collect_pefs
from npeff_lens.models import load_model
from npeff_lens.store import PEFStore
from npeff_lens.tasks import LabelTokens

WORDS = "great dull moving boring fun sad happy awful wonderful terrible brilliant good bad film movie".split()
rng = random.Random(0)
texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(1000)]
m = load_model("tiny-llama")
task = LabelTokens("Review: {text} Sentiment:", [" bad", " sad"])
root = Path(tempfile.mkdtemp())
kw = dict(proj_dim=512, dtype="float32", batch_size=4, shard_size=100, flush_every=200, progress=False)
t0 = time.time()
collect_pefs(m, texts, task, root / "ref", **kw)
full = time.time() - t0
shutil.copytree(root / "ref", root / "s")
e = json.loads((root / "s" / "index.jsonl").read_text().splitlines()[5])
f = root / "s" / "shards" / e["data"]
raw = bytearray(f.read_bytes())
raw[-100] ^= 0x10
f.write_bytes(bytes(raw))
rep = PEFStore.repair(root / "s")
t0 = time.time()
collect_pefs(m, texts, task, root / "s", **kw)
again = time.time() - t0
a, b = PEFStore(root / "ref"), PEFStore(root / "s")
print(
    f"full collection of 1000: {full:.1f}s; repair -> missing {rep['missing']}; "
    f"recollect: {again:.1f}s ({again / full:.1%}); "
    f"equal bytes: {torch.equal(a.load_pefs(), b.load_pefs()) and a.read_metadata() == b.read_metadata()}"
)
