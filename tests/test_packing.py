"""Sequence packing: a packed batch is the unpacked batch laid out differently, nothing more.

A real tiny CLIP + Llama MultimodalLM with images and PRIOR-style token weights: per-sample losses,
the batch loss and the gradients must match the right-padded batch (up to fp32 summation order).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import write_tiny_world
from torch import nn

from encoders.towers import TowerConfig
from mllm.chat import IGNORE_INDEX, encode_conversation
from mllm.data.conversations import Collator, ConversationDataset
from mllm.data.packing import PackingError, check_packing_support, first_fit_decreasing
from mllm.model import MultimodalLM, build_lm

CONVS = [
    ([{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}], 1),
    ([{"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "3"}], 0),
    (
        [
            {"from": "human", "value": "Describe the image briefly.\n<image>"},
            {
                "from": "gpt",
                "value": "A large red circle at the top left and a small blue triangle pointing up.",
            },
            {"from": "human", "value": "What shape is the blue object?"},
            {"from": "gpt", "value": "triangle"},
        ],
        1,
    ),
    (
        [
            {"from": "human", "value": "<image>\nIs the triangle pointing up or down?"},
            {"from": "gpt", "value": "up"},
        ],
        1,
    ),
    ([{"from": "human", "value": "What color is the circle?"}, {"from": "gpt", "value": "blue green"}], 0),
]


def _model(tokenizer, attn: str) -> MultimodalLM:
    from conftest import TINY_LM, TINY_TOWER

    torch.manual_seed(0)
    lm = build_lm(None, TINY_LM, len(tokenizer), attn=attn)
    m = MultimodalLM.build(
        TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1),
        "mlp2x_gelu",
        lm,
        tokenizer,
        template="chatml",
        max_length=128,
    )
    return m.eval()


def _items(model, tok, weighted: bool) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    items = []
    for i, (conv, n_img) in enumerate(CONVS):
        enc = encode_conversation(conv, tok, "chatml", model.image_token_id, model.num_image_tokens, n_img)
        it = {
            "id": f"s{i}",
            **enc,
            "pixel_values": torch.randn(n_img, 3, 32, 32, generator=g) if n_img else None,
        }
        if weighted:  # PRIOR-like: positive weights on labelled positions, 0 elsewhere
            on = enc["labels"] != IGNORE_INDEX
            it["token_weights"] = torch.where(
                on, torch.rand(on.shape, generator=g) * 2, torch.zeros(on.shape)
            )
        items.append(it)
    return items


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("skips", "ids")}


def _segments(batch: dict, pad_id: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of each sample in batch order (`ids` order)."""
    if "position_ids" not in batch:
        lens = batch["attention_mask"].sum(1).tolist()
        return [(r, 0, n) for r, n in enumerate(lens)]
    segs = []
    pos, ids = batch["position_ids"], batch["input_ids"]
    for r in range(pos.shape[0]):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
        # a row's padding tail is a segment of its own, all pad ids (no real sample is)
        segs += [(r, a, b) for a, b in zip(starts, starts[1:]) if not bool((ids[r, a:b] == pad_id).all())]
    assert len(segs) == len(batch["ids"])
    return segs


def _per_sample(model, batch: dict) -> dict[str, torch.Tensor]:
    """Sample id -> sum of w * CE over its labelled positions, from the model's full logits."""
    logits = model(**{k: v for k, v in _inputs(batch).items() if k not in ("labels", "token_weights")}).logits
    out = {}
    for sid, (r, a, b) in zip(batch["ids"], _segments(batch, model.tokenizer.pad_token_id)):
        lab = batch["labels"][r, a + 1 : b]
        on = lab != IGNORE_INDEX
        ce = F.cross_entropy(logits[r, a : b - 1][on].float(), lab[on], reduction="none")
        if "token_weights" in batch:
            ce = ce * batch["token_weights"][r, a + 1 : b][on]
        out[sid] = ce.sum()
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_matches_unpacked(tokenizer, attn):
    model = _model(tokenizer, attn)
    items = _items(model, tokenizer, weighted=True)
    plain = Collator(tokenizer.pad_token_id)(items)
    packed = Collator(tokenizer.pad_token_id, pack_length=max(len(it["input_ids"]) for it in items) + 20)(
        items
    )
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # it did pack
    assert "attention_mask" not in packed and sorted(packed["ids"]) == sorted(plain["ids"])
    assert packed["pixel_values"].shape == plain["pixel_values"].shape

    a, b = _per_sample(model, plain), _per_sample(model, packed)
    for sid in a:
        assert torch.allclose(a[sid], b[sid], rtol=1e-5, atol=1e-5), (sid, a[sid], b[sid])

    # The batch loss (weighted, per labelled token over the batch) and its gradients are the same.
    grads = []
    for batch in (plain, packed):
        model.zero_grad()
        out = model(**_inputs(batch))
        out.loss.backward()
        grads.append(
            (
                out.loss.detach(),
                out.num_loss_tokens,
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
        )
    (l0, n0, g0), (l1, n1, g1) = grads
    assert n0 == n1 and torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    assert set(g0) == set(g1) and any(n.startswith("tower.") for n in g0)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n


def test_packing_never_predicts_across_samples(tokenizer):
    """LM-pretraining-style samples label every token, the first one too: packed, a sample's first
    token must not become a target of the previous sample's last token."""
    model = _model(tokenizer, "sdpa")
    ids = [
        tokenizer(t, return_tensors="pt")["input_ids"][0] for t in ("red blue green", "How many shapes?", "3")
    ]
    items = [
        {"id": str(i), "input_ids": x, "labels": x.clone(), "pixel_values": None} for i, x in enumerate(ids)
    ]
    plain = Collator(tokenizer.pad_token_id)(items)
    packed = Collator(tokenizer.pad_token_id, pack_length=64)(items)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        p, q = model(**_inputs(plain)), model(**_inputs(packed))
    assert p.num_loss_tokens == q.num_loss_tokens
    assert torch.allclose(p.loss, q.loss, atol=1e-6)


def test_first_fit_decreasing_bins():
    lengths = [5, 9, 3, 7, 2, 10, 1]
    rows = first_fit_decreasing(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # sum 37 -> at least 4 rows of 10; FFD reaches it here
    assert rows[0] == [5]  # longest first
    with pytest.raises(PackingError, match="sample-x: 11 tokens do not fit a packed row of 10"):
        first_fit_decreasing([3, 11], 10, names=["a", "sample-x"])


def test_unsupported_attention_is_refused():
    lm = nn.Linear(2, 2)
    lm.config = SimpleNamespace(_attn_implementation="my_kernel")
    with pytest.raises(PackingError, match="my_kernel"):
        check_packing_support(lm)


def test_dataset_collator_packs_real_files(tokenizer, tmp_path):
    """ConversationDataset (real PNGs) -> packing Collator -> a loss equal to the padded batch's."""
    from mllm.tokenizer import ensure_image_token

    world = write_tiny_world(tmp_path, n=6)
    ensure_image_token(tokenizer, "<image>")
    model = _model(tokenizer, "sdpa")
    ds = ConversationDataset(
        world["instruct"],
        world["images"],
        tokenizer,
        "chatml",
        model.image_token_id,
        model.num_image_tokens,
        model.tower.preprocess,
        128,
    )
    items = [ds[i] for i in range(len(ds))]
    plain = Collator(tokenizer.pad_token_id)(items)
    packed = Collator(tokenizer.pad_token_id, pack_length=128)(items)
    assert packed["input_ids"].shape[0] < len(items)
    with torch.no_grad():
        assert torch.allclose(model(**_inputs(plain)).loss, model(**_inputs(packed)).loss, atol=1e-5)


def test_gradient_checkpointing_switch_keeps_gradients(tokenizer):
    """The stage switch recomputes activations in LM and tower; gradients are unchanged."""
    from mllm.config import StageConfig
    from mllm.families.mllm import _speed_switches

    model = _model(tokenizer, "sdpa").train()
    batch = Collator(tokenizer.pad_token_id, pack_length=256)(_items(model, tokenizer, weighted=False))
    model.zero_grad()
    model(**_inputs(batch)).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    collate = _speed_switches(model, StageConfig(gradient_checkpointing=True), None)
    assert collate.pack_length is None  # packing stays off unless data.packing
    assert model.lm.is_activation_checkpointing and model.tower.model.is_activation_checkpointing
    model.zero_grad()
    model(**_inputs(batch)).loss.backward()
    for n, g in want.items():
        assert torch.allclose(model.get_parameter(n).grad, g, rtol=1e-5, atol=1e-7), n
