"""Bisect (not project code): how fast does the demo's LM shape learn *all* GeoWorld question families
when it is handed the scene perfectly, with no tower at all? Three forms of the scene (docs/results.md,
"Fourth round"):

- slots (default): K image tokens, one per object (reading order, the rest zero), each the sum of its
  words' embeddings (colour, shape, size, orientation) plus a linear position code in word space,
  (1-x)·"left" + x·"right" + (1-y)·"top" + y·"bottom";
- TEXT=1: the scene written as words at the image marker ("red small circle left top , ...");
- FOCUS=1: slots, with a first token that is the slots weighted by their match to the question's words
  (IDEAL=1: only the question's attribute words take part, an ideal matcher; BETA its sharpness;
  FOCUS_ONLY=1: that token alone, the other slots zero).

The LM is fresh (the demo's 3×128 Llama unless WIDTH/LAYERS/HEADS), trained on live GeoWorld single
questions in the chat template (AdamW, 60-step warm-up, clipping 1.0, batch 32); loss and logits only
at answer tokens. Prints first-answer-token accuracy per category on each batch before its update.
Other knobs: STEPS, LR, MIMETIC=1, K, BATCH, TURNS (questions per image), MAXSHAPES, CURRIC (samples
over which scenes grow from 1 object to MAXSHAPES), ONLY=<category>, SHAPE_WORD=1, POS=linear|none,
SHUFFLE=1, TOKFIX=1 (a tokenizer trained with the chat template's role words, WORLD its corpus).

Usage: TEXT=1 python scripts/models_that_see/slots_oracle.py runs/exp/anL/align/final
"""

from __future__ import annotations

import collections
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from mllm.config import LiveWorldConfig
from mllm.data.conversations import Collator
from mllm.data.geoworld.live import LiveWorldDataset
from mllm.model import MultimodalLM

torch.manual_seed(0)
torch.set_num_threads(1)
K = int(os.environ.get("K", "6"))
STEPS = int(os.environ.get("STEPS", "1500"))
LR = float(os.environ.get("LR", "1e-3"))
BATCH = int(os.environ.get("BATCH", "32"))
POS = os.environ.get("POS", "linear")
ONLY = os.environ.get("ONLY")
FOCUS = os.environ.get("FOCUS") == "1"
BETA = float(os.environ.get("BETA", "10"))
IDEAL = os.environ.get("IDEAL") == "1"
base = MultimodalLM.from_pretrained(sys.argv[1])
tok = base.tokenizer
if os.environ.get("TOKFIX") == "1":  # a tokenizer that also learned the chat template's role words
    from pathlib import Path

    from mllm.data.corpus import corpus_from_records
    from mllm.tokenizer import ensure_image_token, train_tokenizer

    world = Path(os.environ.get("WORLD", "runs/demo/world"))
    texts = corpus_from_records([world / "instruct.json", world / "align.json"])
    tok = train_tokenizer(texts + ["<|im_start|>user\n", "<|im_start|>assistant\n"] * 2000, 2048)
    ensure_image_token(tok)
    base.lm.config.vocab_size = len(tok)
IMG_ID = tok.convert_tokens_to_ids("<image>")
cfg = base.lm.config
for key, name in (
    ("WIDTH", "hidden_size"),
    ("LAYERS", "num_hidden_layers"),
    ("HEADS", "num_attention_heads"),
):
    if os.environ.get(key):
        setattr(cfg, name, int(os.environ[key]))
cfg.num_key_value_heads = cfg.num_attention_heads
cfg.intermediate_size = 3 * cfg.hidden_size
cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
lm = LlamaForCausalLM(cfg)
if os.environ.get("MIMETIC") == "1":
    from mllm.lm_init import apply_lm_init

    apply_lm_init(lm, "mimetic")
emb = lm.get_input_embeddings()
ds = LiveWorldDataset(
    LiveWorldConfig(
        turns=(int(os.environ.get("TURNS", "1")),) * 2,
        existence=0,
        seed=5,
        max_shapes=int(os.environ.get("MAXSHAPES", "5")),
        curriculum=int(os.environ.get("CURRIC", "0")),
    ),
    tok,
    "chatml",
    IMG_ID,
    K,
    lambda images: torch.zeros(1),
    256,
    base.meta.image_placement,
)
ds._image = lambda scene, rng: None  # the pixels are not needed
collate = Collator(tok.pad_token_id)


def wid(word: str) -> int:
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    return ids[0]


def slot_tokens(scene) -> torch.Tensor:
    out = torch.zeros(K, emb.weight.shape[1])
    shapes = list(scene.shapes) if scene.figure is None else []
    if os.environ.get("SHUFFLE") == "1":
        random.shuffle(shapes)
    first = 1 if FOCUS else 0
    for j, s in enumerate(shapes[: K - first], start=first):
        words = [s.color, s.kind, s.size] + ([s.orientation] if s.orientation else [])
        if os.environ.get("SHAPE_WORD") == "1":
            words.append("shape")
        v = emb.weight[[wid(w) for w in words]].sum(0)
        if POS == "linear":
            x, y = s.x / scene.width, s.y / scene.height
            v = v + (1 - x) * emb.weight[wid("left")] + x * emb.weight[wid("right")]
            v = v + (1 - y) * emb.weight[wid("top")] + y * emb.weight[wid("bottom")]
        out[j] = v
    return out


TEXT = os.environ.get("TEXT") == "1"  # the scene as words in the text instead of image tokens


def describe_scene(scene) -> str:
    from mllm.data.geoworld.scene import region_of

    parts = []
    for s in scene.shapes if scene.figure is None else []:
        reg = region_of(s.x, s.y, scene.width, scene.height).split()
        col = next((w for w in reg if w in ("left", "right")), "center")
        row = next((w for w in reg if w in ("top", "bottom")), "center")
        parts.append(
            " ".join([s.color, s.size, s.kind] + ([s.orientation] if s.orientation else []) + [col, row])
        )
    return " " + " , ".join(parts) if parts else " figure"


def text_item(i: int) -> dict:
    from mllm.chat import encode_conversation
    from mllm.data.geoworld.live import conversation, qa_turns

    scene, rng = ds.scene(i)
    conv = conversation(qa_turns(scene, rng, ds.cfg), ds.placement)
    conv[0]["value"] = conv[0]["value"].replace("<image>", describe_scene(scene))
    enc = encode_conversation(
        conv, tok, "chatml", IMG_ID, K, num_images=0, max_length=int(os.environ.get("MAXLEN", "256"))
    )
    return {"index": i, "id": f"t-{i}", **enc, "pixel_values": torch.zeros(1)}


from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES  # noqa: E402

ATTR_IDS = {
    wid(w)
    for w in (*COLOR_NAMES, *SHAPES, "small", "large", "up", "down", "left", "right", "top", "bottom")
    + ("horizontal", "vertical")
}

CATS = [
    ("What color", "colour"),
    ("What shape", "shape"),
    ("How many", "count"),
    ("small or large", "size"),
    ("pointing", "orientation"),
    ("horizontal or vertical", "orientation"),
    ("Is there", "existence"),
    ("left", "position"),
    ("top or the bottom", "position"),
    ("above", "position"),
]


def category(text: str) -> str:
    for key, cat in CATS:
        if key in text:
            return cat
    return "math"


params = list(lm.parameters())
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 60))
step, cursor, t0 = 0, 0, time.time()
hits, total = collections.Counter(), collections.Counter()
while step < STEPS:
    items, scenes = [], []
    while len(items) < BATCH:
        item = text_item(cursor) if TEXT else ds[cursor]
        if not ONLY or category(tok.decode(item["input_ids"].tolist())) == ONLY:
            items.append(item)
            scenes.append(ds.scene(cursor)[0])
        cursor += 1
    b = collate(items)
    ids, labels = b["input_ids"], b["labels"]
    is_img = ids == IMG_ID
    x = emb(ids.masked_fill(is_img, 0))
    img = torch.stack([slot_tokens(s) for s in scenes])
    if FOCUS:  # a first token: the slots weighted by how well each matches the question's words
        end_id = tok.convert_tokens_to_ids("<|im_end|>")
        focus = []
        for r in range(ids.shape[0]):
            row = ids[r].tolist()
            last = max(k for k, t in enumerate(row) if t == IMG_ID)
            q = row[last + 1 : row.index(end_id, last)]
            if IDEAL:  # only the question's attribute words take part (an ideal matcher)
                q = [t for t in q if t in ATTR_IDS] or q
            qe = F.normalize(emb.weight[q].detach(), dim=-1)
            se = F.normalize(img[r, 1:].detach(), dim=-1)
            score = (se @ qe.T).sum(-1) * BETA
            live = img[r, 1:].abs().sum(-1) > 0
            w = score.masked_fill(~live, -1e9).softmax(-1) * live.any()
            focus.append(w @ img[r, 1:])
        rest = img[:, 1:] * (
            0.0 if os.environ.get("FOCUS_ONLY") == "1" else 1.0
        )  # FOCUS_ONLY: the referent alone
        img = torch.cat([torch.stack(focus)[:, None], rest], 1)
    x = x.masked_scatter(is_img.unsqueeze(-1), img.to(x.dtype))
    h = lm.model(inputs_embeds=x, attention_mask=b["attention_mask"]).last_hidden_state[:, :-1]
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = lm.lm_head(h[sel])
    loss = F.cross_entropy(logits, tgt[sel])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    sched.step()
    step += 1
    pred = torch.full_like(tgt, -1)
    pred[sel] = logits.argmax(-1)
    for r in range(ids.shape[0]):
        pos = sel[r].nonzero().flatten().tolist()
        starts = [p for p in pos if p - 1 not in pos]
        for p in starts:  # each answer's first token, its category from the text before it
            text = tok.decode(ids[r, : p + 1].tolist()).split("user")[-1]
            cat = category(text)
            hits[cat] += int(pred[r, p] == tgt[r, p])
            total[cat] += 1
    if step % 100 == 0:
        acc = {c: round(100 * hits[c] / total[c]) for c in sorted(total)}
        allacc = round(100 * sum(hits.values()) / sum(total.values()), 1)
        print(step, round(loss.item(), 3), allacc, acc, f"{time.time() - t0:.0f}s", flush=True)
        hits, total = collections.Counter(), collections.Counter()
