"""Binding probe (not project code): can a 3-layer Llama (128 wide, the demo's LM shape) learn to answer
"what colour is the <shape>" / "what shape is the <colour> one" over 64 image tokens, when each object's
patches are exactly the sum of its colour and shape word embeddings? It isolates the LM side of
"Models that see" from the tower (docs/results.md).

Knobs (environment): ORDER=q_first|img_first (question before or after the image tokens), T=questions
per image (the first placed by ORDER, later ones after the image), BG=zero|const (background patches as
zero vectors or as one constant non-zero embedding), EXTRA=more attribute words per object patch, NOISE=share of patch labels replaced at random,
LR, STEPS. Prints held-out accuracy of the first and of later questions every 100 steps.
Toward the pipeline, one difference at a time: GEO=1 (GeoWorld's scenes and patch labels instead of
4-patch blobs), PIPE=words|chatml (the pipeline's tokenizer and question wording, bare or inside the
chat template; image tokens are the question-form word embeddings summed), OBJ=1 (one token per
object instead of 64 patches), WIDTH/HEADS/LAYERS (the LM's shape), MIMETIC=1 (attention starts as
content matching and copying, `mllm.lm_init`'s `mimetic`; MIMETIC_VO scales the copy).

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
PIPE = os.environ.get("PIPE", "")  # "chatml": the pipeline's tokenizer, wording and chat template
if PIPE:
    from mllm.tokenizer import load_tokenizer

    TOK = load_tokenizer(os.environ.get("TOKENIZER", "runs/exp/anK/align/final/tokenizer"))
    V = len(TOK)
    _ids = lambda text: TOK(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    from mllm.data.geoworld.vocab import COLOR_NAMES as _CN
    from mllm.data.geoworld.vocab import SHAPES as _SH

    W_COL = [TOK.convert_tokens_to_ids("Ġ" + w) for w in _CN]
    W_SH = [TOK.convert_tokens_to_ids("Ġ" + w) for w in _SH]
    A_COL = [_ids(w)[0] for w in _CN]
    A_SH = [_ids(w)[0] for w in _SH]
WIDTH, HEADS, LAYERS = (int(os.environ.get(k, d)) for k, d in (("WIDTH", 128), ("HEADS", 4), ("LAYERS", 3)))
cfg = LlamaConfig(
    vocab_size=V,
    hidden_size=WIDTH,
    intermediate_size=3 * WIDTH,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=HEADS,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
lm = LlamaForCausalLM(cfg)
if (
    os.environ.get("MIMETIC") == "1"
):  # attention starts as content matching (W_q W_k^T ~ I) and copying (W_o W_v ~ I)
    with torch.no_grad():
        for layer in lm.model.layers:
            a = layer.self_attn
            w = torch.randn_like(a.q_proj.weight) / WIDTH**0.5
            a.q_proj.weight.copy_(w)
            a.k_proj.weight.copy_(w)
            v = torch.randn_like(a.v_proj.weight) / WIDTH**0.5
            a.v_proj.weight.copy_(v)
            a.o_proj.weight.copy_(v.T * float(os.environ.get("MIMETIC_VO", "1")))
emb = lm.get_input_embeddings()


def scene():
    n = random.randint(1, 5)
    cols = [random.randrange(C) for _ in range(n)]
    shapes = random.sample(range(S), n)
    cells = random.sample(range(64), n * 4)
    grid = [None] * 64
    for i in range(n):
        for c in cells[i * 4 : (i + 1) * 4]:
            grid[c] = i
    return n, cols, shapes, grid


GEO = os.environ.get("GEO") == "1"  # GeoWorld's scenes and patch labels instead of 4-patch blobs
if GEO:
    from encoders.supervised import PatchTargets
    from mllm.data.geoworld.sampling import stream, world_scene
    from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
    from mllm.data.scene_labels import patch_labels

    _PT = PatchTargets(COLOR_NAMES, SHAPES)
    _count = [0]


def geo_scene():
    while True:
        _count[0] += 1
        sc = world_scene(stream(7, "probe", _count[0], 0), 64, 0.0, 5)
        kinds = [s.kind for s in sc.shapes]
        if len(set(kinds)) == len(kinds):
            break
    lab = patch_labels(sc.to_dict(), (8, 8), _PT)
    cols = [COLOR_NAMES.index(s.color) for s in sc.shapes]
    shapes = [SHAPES.index(s.kind) for s in sc.shapes]
    grid = [None if int(lab["shape"][p]) == 0 else shapes.index(int(lab["shape"][p]) - 1) for p in range(64)]
    return len(sc.shapes), cols, shapes, grid


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
        n, cols, shapes, grid = geo_scene() if GEO else scene()
        img = []
        for g in grid:
            if g is None:
                img.append(torch.zeros(WIDTH) if BG == "zero" else table[PAD] + 0.0)
                continue
            c, s = cols[g], shapes[g]
            if random.random() < NOISE:
                c = random.randrange(C)
            if random.random() < NOISE:
                s = random.randrange(S)
            extra = sum((table[X0 + 3 * e + (hash((g, e, n)) % 3)] for e in range(EXTRA)), torch.zeros(WIDTH))
            img.append(
                (table[W_COL[c]] + table[W_SH[s]]) if PIPE else (table[COL0 + c] + table[SH0 + s] + extra)
            )
        img = torch.stack(img)
        if os.environ.get("OBJ") == "1":  # one token per object (first patch in reading order), 5 slots
            order = [g for k, g in enumerate(grid) if g is not None and g not in grid[:k]]
            slots = [img[grid.index(g)] for g in order] + [torch.zeros(WIDTH)] * (5 - len(order))
            img = torch.stack(slots)
        parts, tgt = [], []
        qs = [question(n, cols, shapes) for _ in range(T)]
        for j, (q, a) in enumerate(qs):
            if PIPE:
                if q[0] == QC:
                    text, a = f"What color is the {_SH[q[1] - SH0]}?", A_COL[a - COL0]
                else:
                    text, a = f"What shape is the {_CN[q[1] - COL0]} object?", A_SH[a - SH0]
                if ORDER == "img_first":  # LLaVA's order: "<image>\n{question}"
                    pre = _ids("<|im_start|>user\n") if PIPE == "chatml" else []
                    post = _ids(
                        "\n" + text + ("<|im_end|>\n<|im_start|>assistant\n" if PIPE == "chatml" else "")
                    )
                    post = post if PIPE == "chatml" else post + [SEP]
                else:
                    pre = _ids("<|im_start|>user\n" + text + "\n") if PIPE == "chatml" else _ids(text)
                    post = _ids("<|im_end|>\n<|im_start|>assistant\n") if PIPE == "chatml" else [SEP]
                parts += ([emb(torch.tensor(pre))] if pre else []) + [img]
                parts += [emb(torch.tensor(post[:-1]))] if len(post) > 1 else []
                parts.append(emb(torch.tensor(post[-1:])))
                tgt.append((sum(p.shape[0] for p in parts) - 1, a))
                parts.append(emb(torch.tensor([a])))
                continue
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
        print(
            step,
            round(loss.item(), 3),
            "first",
            round(accuracy(logits, first), 3),
            "later",
            round(accuracy(logits, later), 3),
            f"{time.time() - t0:.0f}s",
            flush=True,
        )
