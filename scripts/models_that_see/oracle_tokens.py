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
m = MultimodalLM.from_pretrained(sys.argv[1]).train()
m.tower.eval()
if os.environ.get("FRESH") == "1":
    for mod in m.lm.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(mod.weight, std=0.02)
            if getattr(mod, "bias", None) is not None:
                torch.nn.init.zeros_(mod.bias)
T = PatchTargets(COLOR_NAMES, SHAPES)
ds = LiveWorldDataset(LiveWorldConfig(turns=(1, 1), existence=0, seed=5), m.tokenizer, "chatml", m.image_token_id,
                      m.num_image_tokens, m.preprocess, 256, m.meta.image_placement)
collate = Collator(m.tokenizer.pad_token_id)
proj, emb = m.projector, m.lm.get_input_embeddings()
params = list(m.lm.parameters())
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 60))


def tokens(idx: list[int], pix: torch.Tensor) -> torch.Tensor:
    if not ORACLE:
        with torch.no_grad():
            feats = m.tower_features(pix)
        return proj(feats, emb)
    table = proj.table(emb)
    out = []
    for i in idx:
        scene, _ = ds.scene(i)
        lab = patch_labels(scene.to_dict(), m.tower.grid, T) if scene.figure is None else None
        onehot = torch.cat([F.one_hot(lab[k] if lab is not None else torch.zeros(64, dtype=torch.long), n).float()
                            for k, n in T.heads().items()], -1)
        seen = (lab["colour"] != 0).float()[:, None] if lab is not None else torch.zeros(64, 1)
        out.append(seen * (onehot @ table))
    return torch.stack(out)


step, cursor, t0 = 0, 0, time.time()
hits, total = 0, 0
while step < int(os.environ.get("STEPS", "600")):
    idx, items = [], []
    while len(idx) < 32:
        item = ds[cursor]
        if not ONLY or ONLY in m.tokenizer.decode(item["input_ids"].tolist()):
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
        print(step, round(loss.item(), 3), "first answer token accuracy", round(hits / total, 3),
              f"{time.time() - t0:.0f}s", flush=True)
        hits, total = 0, 0
