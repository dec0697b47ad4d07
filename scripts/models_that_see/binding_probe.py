"""Binding probe (not project code): can a 3-layer Llama (128 wide, the demo's LM shape) learn to answer
"what colour is the <shape>" / "what shape is the <colour> one" over 64 image tokens, when each object's
patches are exactly the sum of its colour and shape word embeddings? It isolates the LM side of
"Models that see" from the tower (docs/results.md).

Knobs (environment): ORDER=q_first|img_first (question before or after the image tokens), T=questions
per image (the first placed by ORDER, later ones after the image), BG=zero|const (background patches as
zero vectors or as one constant non-zero embedding), EXTRA=more attribute words per object patch, NOISE=share of patch labels replaced at random,
LR, STEPS. Prints held-out accuracy of the first and of later questions every 100 steps.

Usage: T=1 BG=zero ORDER=q_first python scripts/models_that_see/binding_probe.py
"""

from __future__ import annotations

import os
import random
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

LR = float(os.environ.get("LR", "1e-3"))
ORDER = os.environ.get("ORDER", "q_first")
T = int(os.environ.get("T", "1"))
NOISE = float(os.environ.get("NOISE", "0"))
STEPS = int(os.environ.get("STEPS", "600"))
BG = os.environ.get("BG", "zero")
EXTRA = int(os.environ.get("EXTRA", "0"))  # more attribute words (3 values each) summed into object patches
torch.manual_seed(0)
random.seed(0)
torch.set_num_threads(1)
C, S = 8, 8  # colours, shapes
PAD, SEP, ANS = 0, 1, 2
COL0, SH0 = 3, 3 + C
QC, QS, Q3 = 3 + C + S, 4 + C + S, 5 + C + S  # "what colour", "what shape", "?"
X0 = 6 + C + S
V = X0 + 3 * EXTRA
cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
lm = LlamaForCausalLM(cfg)
emb = lm.get_input_embeddings()


def scene():
    n = random.randint(1, 5)
    cols = [random.randrange(C) for _ in range(n)]
    shapes = random.sample(range(S), n)
    cells = random.sample(range(64), n * 4)
    grid = [None] * 64
    for i in range(n):
        for c in cells[i * 4:(i + 1) * 4]:
            grid[c] = i
    return n, cols, shapes, grid


def question(n, cols, shapes):
    if random.random() < 0.5:
        k = random.randrange(n)
        return [QC, SH0 + shapes[k], Q3], COL0 + cols[k]
    uniq = [i for i in range(n) if cols.count(cols[i]) == 1]
    if not uniq:
        k = random.randrange(n)
        return [QC, SH0 + shapes[k], Q3], COL0 + cols[k]
    k = random.choice(uniq)
    return [QS, COL0 + cols[k], Q3], SH0 + shapes[k]


def batch(b=32):
    table = emb.weight
    seqs, targets = [], []
    for _ in range(b):
        n, cols, shapes, grid = scene()
        img = []
        for g in grid:
            if g is None:
                img.append(torch.zeros(128) if BG == "zero" else table[PAD] + 0.0)
                continue
            c, s = cols[g], shapes[g]
            if random.random() < NOISE:
                c = random.randrange(C)
            if random.random() < NOISE:
                s = random.randrange(S)
            extra = sum((table[X0 + 3 * e + (hash((g, e, n)) % 3)] for e in range(EXTRA)), torch.zeros(128))
            img.append(table[COL0 + c] + table[SH0 + s] + extra)
        img = torch.stack(img)
        parts, tgt = [], []
        qs = [question(n, cols, shapes) for _ in range(T)]
        for j, (q, a) in enumerate(qs):
            qe = emb(torch.tensor(q + [SEP]))
            if j == 0 and ORDER == "q_first":
                parts += [qe, img]
            elif j == 0:
                parts += [img, qe]
            else:
                parts += [qe]
            parts.append(emb(torch.tensor([ANS])))
            tgt.append((sum(p.shape[0] for p in parts) - 1, a))
            parts.append(emb(torch.tensor([a])))
        seqs.append(torch.cat(parts))
        targets.append(tgt)
    length = max(s.shape[0] for s in seqs)
    return torch.stack([F.pad(s, (0, 0, 0, length - s.shape[0])) for s in seqs]), targets


def accuracy(logits, items):
    return sum(int(logits[b, p].argmax() == a) for b, p, a in items) / max(1, len(items))


opt = torch.optim.AdamW(lm.parameters(), lr=LR, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 60))
t0 = time.time()
for step in range(1, STEPS + 1):
    x, tg = batch()
    logits = lm(inputs_embeds=x).logits
    rows = [b for b, ts in enumerate(tg) for _ in ts]
    cols_ = [p for ts in tg for p, _ in ts]
    y = torch.tensor([a for ts in tg for _, a in ts])
    loss = F.cross_entropy(logits[rows, cols_], y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    sched.step()
    if step % 100 == 0:
        with torch.no_grad():
            x, tg = batch(128)
            logits = lm(inputs_embeds=x).logits
        first = [(b, ts[0][0], ts[0][1]) for b, ts in enumerate(tg)]
        later = [(b, p, a) for b, ts in enumerate(tg) for p, a in ts[1:]]
        print(step, round(loss.item(), 3), "first", round(accuracy(logits, first), 3), "later",
              round(accuracy(logits, later), 3), f"{time.time() - t0:.0f}s", flush=True)
