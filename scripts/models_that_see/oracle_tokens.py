"""Bisect (not project code): the pipeline's own LM, tokenizer, chat template and live GeoWorld questions,
with the image tokens taken either from the scene graph (ORACLE=1: each patch's true labels, one-hot,
through an anchored projector's word table; background patches zero) or from the tower (ORACLE=0).
If perfect tokens do not make the LM learn, the blocker is on the LM / data side, not perception.

Trains the LM only (AdamW 1e-3, 60-step warm-up, clipping 1.0, batch 32 single-question samples) and
prints the accuracy of each sample's first answer token on the batch before its update, per 100 steps.
Knobs: ORACLE=1|0, STEPS, ONLY=<substring a question must contain> (e.g. "What color"), FRESH=1
(re-initialise the LM instead of the saved, text-pretrained one).

Usage: ORACLE=1 python scripts/models_that_see/oracle_tokens.py RUN/align/final   (an anchored model)
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

from encoders.supervised import PatchTargets
from mllm.config import LiveWorldConfig
from mllm.data.conversations import Collator
from mllm.data.geoworld.live import LiveWorldDataset
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.data.scene_labels import patch_labels
from mllm.model import MultimodalLM

torch.manual_seed(0)
torch.set_num_threads(1)
ORACLE = os.environ.get("ORACLE", "1") == "1"
ONLY = os.environ.get("ONLY")
WORDS = os.environ.get("WORDS")  # e.g. "colour,shape": oracle tokens carry only these groups' words
TEMPLATE = os.environ.get("TEMPLATE", "chatml")
SIMPLE = (
    os.environ.get("SIMPLE") == "1"
)  # the probe's two question families, through the pipeline's tokenizer
m = MultimodalLM.from_pretrained(sys.argv[1]).train()
m.tower.eval()
if os.environ.get("FRESH") == "1":
    for mod in m.lm.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(mod.weight, std=0.02)
            if getattr(mod, "bias", None) is not None:
                torch.nn.init.zeros_(mod.bias)
if os.environ.get("MIMETIC") == "1":
    from mllm.lm_init import apply_lm_init

    apply_lm_init(m.lm, "mimetic")
T = PatchTargets(COLOR_NAMES, SHAPES, density=True)
ds = LiveWorldDataset(
    LiveWorldConfig(turns=(1, 1), existence=0, seed=5),
    m.tokenizer,
    TEMPLATE,
    m.image_token_id,
    m.num_image_tokens,
    m.preprocess,
    256,
    m.meta.image_placement,
)
collate = Collator(m.tokenizer.pad_token_id)
proj, emb = m.projector, m.lm.get_input_embeddings()
params = list(m.lm.parameters())
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 60))


def simple_item(i: int) -> dict:
    """Sample i's scene asked the probe's way: the colour of a unique shape, or the shape of a unique colour."""
    import random

    from mllm.data.geoworld.live import conversation

    scene, _ = ds.scene(i)
    rng = random.Random(i)
    kinds = [s.kind for s in scene.shapes]
    cols = [s.color for s in scene.shapes]
    qs = [(f"What color is the {s.kind}?", s.color) for s in scene.shapes if kinds.count(s.kind) == 1]
    qs += [(f"What shape is the {s.color} object?", s.kind) for s in scene.shapes if cols.count(s.color) == 1]
    if scene.figure is not None or not qs:
        return None
    conv = conversation([rng.choice(qs)], m.meta.image_placement)
    enc = ds._encode(conv, f"simple #{i}")
    return {"index": i, "id": f"s-{i}", **enc, "pixel_values": ds.preprocess([ds._image(scene, rng)])}


def tokens(idx: list[int], pix: torch.Tensor) -> torch.Tensor:
    if not ORACLE:
        with torch.no_grad():
            feats = m.tower_features(pix)
        return proj(feats, emb)
    table = proj.table(emb)
    if os.environ.get("FORM") == "probe":  # the probe's tokens: the question-form word embeddings, summed
        rows = [w for g in T.words().values() for w in g]
        ids = [m.tokenizer.convert_tokens_to_ids("Ġ" + w) if w else -1 for w in rows]
        table = torch.stack([emb.weight[i] if i >= 0 else torch.zeros(emb.weight.shape[1]) for i in ids])
    out = []
    for i in idx:
        scene, _ = ds.scene(i)
        lab = patch_labels(scene.to_dict(), m.tower.grid, T) if scene.figure is None else None
        onehot = torch.cat(
            [
                F.one_hot(lab[k] if lab is not None else torch.zeros(64, dtype=torch.long), n).float()
                * (1.0 if not WORDS or k in WORDS.split(",") else 0.0)
                for k, n in T.heads().items()
            ],
            -1,
        )
        seen = (lab["colour"] != 0).float()[:, None] if lab is not None else torch.zeros(64, 1)
        out.append(seen * (onehot @ table))
    return torch.stack(out)


step, cursor, t0 = 0, 0, time.time()
hits, total = 0, 0
while step < int(os.environ.get("STEPS", "600")):
    idx, items = [], []
    while len(idx) < 32:
        item = simple_item(cursor) if SIMPLE else ds[cursor]
        if item is not None and (not ONLY or ONLY in m.tokenizer.decode(item["input_ids"].tolist())):
            idx.append(cursor)
            items.append(item)
        cursor += 1
    b = collate(items)
    ids, labels = b["input_ids"], b["labels"]
    is_img = ids == m.image_token_id
    x = emb(ids.masked_fill(is_img, 0))
    x = x.masked_scatter(is_img.unsqueeze(-1), tokens(idx, b["pixel_values"]).to(x.dtype))
    logits = m.lm(inputs_embeds=x, attention_mask=b["attention_mask"]).logits[:, :-1]
    tgt = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    sched.step()
    step += 1
    pred = logits.argmax(-1)
    for r in range(ids.shape[0]):
        pos = (tgt[r] != -100).nonzero().flatten()
        if len(pos):
            hits += int(pred[r, pos[0]] == tgt[r, pos[0]])
            total += 1
    if step % 100 == 0:
        print(
            step,
            round(loss.item(), 3),
            "first answer token accuracy",
            round(hits / total, 3),
            f"{time.time() - t0:.0f}s",
            flush=True,
        )
        hits, total = 0, 0
