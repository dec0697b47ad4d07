"""How fast can a look learn *where* to attend, with nothing else training? (not project code)

Takes a model folder's tower (frozen) and LM input embeddings (frozen), a fresh readout
(mllm.readout.FocusReadout), and trains only the readout's grounding loss on live GeoWorld questions
(mllm.data.geoworld.referents). Prints, every 50 steps, the loss and how often the head-mean attention's
arg-max lies on a referent patch, on that batch before its update.

Usage: python scripts/models_that_see/ground_only.py MODEL_DIR   (knobs: STEPS, LR, HEADS, DIM, BATCH, OWNEMB=1: a fresh word table
for the question, SCALE: a fixed factor on the attention logits)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from encoders.towers import TowerConfig, build_tower
from mllm.config import LiveWorldConfig
from mllm.data.geoworld.live import qa_turns
from mllm.data.geoworld.referents import referent_patches, referents
from mllm.data.geoworld.render import render
from mllm.data.geoworld.sampling import stream, world_scene
from mllm.readout import FocusReadout, grounding_loss
from mllm.tokenizer import load_tokenizer

STEPS = int(os.environ.get("STEPS", "400"))
LR = float(os.environ.get("LR", "1e-3"))
BATCH = int(os.environ.get("BATCH", "32"))
HEADS = int(os.environ.get("HEADS", "4"))
DIM = int(os.environ.get("DIM", "64"))

d = Path(sys.argv[1])
meta = __import__("json").loads((d / "mllm.json").read_text())
tower = build_tower(TowerConfig(**dict(meta["tower"], path=str(d / "tower"))), load_weights=True).eval()
lm = AutoModelForCausalLM.from_pretrained(str(d / "lm"), local_files_only=True, use_safetensors=True)
emb = lm.get_input_embeddings().weight.detach()
tok = load_tokenizer(d / "tokenizer")
special = set(tok.all_special_ids)
torch.manual_seed(0)
r = FocusReadout(tower.hidden_size, emb.shape[1], heads=HEADS, dim=DIM)
if os.environ.get("OWNEMB") == "1":  # the question's words from a fresh table, not the LM's embeddings
    own = torch.nn.Embedding(emb.shape[0], emb.shape[1])
    r.add_module("own", own)
SCALE = float(os.environ.get("SCALE", "1"))
opt = torch.optim.AdamW(r.parameters(), lr=LR, weight_decay=0.0)
cfg = LiveWorldConfig(turns=(6, 6), existence=2)
t0, cursor = time.time(), 0
for step in range(1, STEPS + 1):
    pix, queries, index, targets = [], [], [], []
    while len(pix) < BATCH:
        rng = stream(7, "ground", cursor, 0)
        cursor += 1
        scene = world_scene(rng, 64, 0.0, 5)
        if scene.figure is not None:
            continue
        for q, _a in qa_turns(scene, rng, cfg):
            ids = [t for t in tok(q, add_special_tokens=False)["input_ids"] if t not in special]
            table = r.own.weight if hasattr(r, "own") else emb
            queries.append(table[ids].mean(0))
            index.append(len(pix))
            targets.append(referent_patches(scene, referents(scene, q), tower.grid))
        pix.append(render(scene))
    with torch.no_grad():
        feats = tower(tower.preprocess(pix)).tokens
    f = r.norm(feats)[torch.tensor(index)]
    qv = r.q(r.qnorm(torch.stack(queries))).view(-1, HEADS, 1, DIM)
    k = r.k(f).view(f.shape[0], f.shape[1], HEADS, DIM).transpose(1, 2)
    a = (SCALE * (qv * k).sum(-1) / DIM**0.5).softmax(-1)
    t = torch.stack(targets)
    loss = grounding_loss(a, t)
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 50 == 0:
        keep = t.sum(-1) > 0
        am = a.mean(1)[keep].argmax(-1)
        hit = t[keep].gather(1, am[:, None]).gt(0).float().mean()
        print(
            step,
            round(loss.item(), 3),
            f"argmax on referent {100 * hit:.1f}%",
            f"{time.time() - t0:.0f}s",
            flush=True,
        )
