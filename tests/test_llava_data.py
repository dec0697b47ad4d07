"""LLaVA's own data files load as they are, and the modality-grouped length order.

The fixtures in tests/data/llava copy the layouts of `llava_v1_5_mix665k.json` (multi-turn, text-only
ShareGPT samples with a `model` field and no `image`, `id` as a string or an int, images under
`coco/train2017/`, `gqa/images/`, `ocr_vqa/images/`, `textvqa/train_images/`, `vg/VG_100K/`) and of
`blip_laion_cc_sbu_558k.json` (`<image>` before or after the prompt, images under `00453/...`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe
from PIL import Image

from mllm.chat import IGNORE_INDEX
from mllm.config import recipe_from_dict
from mllm.data.conversations import Collator, ConversationDataset, image_paths
from mllm.data.samplers import ModalityLengthOrder, build_order, modality_lengths
from mllm.training.runner import build_model, run_stage

DATA = Path(__file__).parent / "data" / "llava"
MIX = DATA / "llava_v1_5_mix665k.sample.json"
BLIP = DATA / "blip_laion_cc_sbu_558k.sample.json"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Real JPEG files at the relative paths the two files name, as LLaVA's image folder holds them."""
    root = tmp_path_factory.mktemp("llava_images")
    rng = random.Random(0)
    for f in (MIX, BLIP):
        for rec in json.loads(f.read_text()):
            for rel in image_paths(rec):
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                size = (rng.randint(30, 80), rng.randint(30, 80))
                Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3))).save(path, "JPEG")
    return root


def _dataset(model, path: Path, root: Path, template: str) -> ConversationDataset:
    return ConversationDataset(
        path,
        root,
        model.tokenizer,
        template,
        model.image_token_id,
        model.num_image_tokens,
        model.tower.preprocess,
        1024,
    )


def test_mix665k_layout_loads_unconverted(tiny_model, image_folder):
    records = json.loads(MIX.read_text())
    ds = _dataset(tiny_model, MIX, image_folder, "chatml")
    assert len(ds) == len(records)
    for i, rec in enumerate(records):
        item = ds[i]
        assert item["id"] == rec["id"]  # int ids stay ints, string ids strings
        n_images = len(image_paths(rec))
        assert (item["pixel_values"] is None) == (n_images == 0)
        assert (
            int((item["input_ids"] == tiny_model.image_token_id).sum())
            == n_images * tiny_model.num_image_tokens
        )
        # one labelled span per assistant turn, each ending in the turn's end marker
        labelled = (item["labels"] != IGNORE_INDEX).int()
        spans = int(((labelled[1:] - labelled[:-1]) == 1).sum()) + int(labelled[0])
        assert spans == sum(t["from"] == "gpt" for t in rec["conversations"])
    batch = Collator(tiny_model.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape[0] == sum(len(image_paths(r)) for r in records)
    out = tiny_model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    assert torch.isfinite(out.loss)


def test_blip558k_alignment_layout_loads_with_the_plain_template(tiny_model, image_folder):
    ds = _dataset(tiny_model, BLIP, image_folder, "plain")
    for i, rec in enumerate(json.loads(BLIP.read_text())):
        item = ds[i]
        n = tiny_model.num_image_tokens
        assert (
            item["input_ids"][:n].tolist() == [tiny_model.image_token_id] * n
        )  # the image, then the caption
        caption = tiny_model.tokenizer.decode(
            item["input_ids"][item["labels"] != IGNORE_INDEX], skip_special_tokens=True
        )
        assert caption == rec["conversations"][1]["value"]


def _global_batches(order: ModalityLengthOrder, epoch: int) -> list[list[int]]:
    flat = order.epoch_indices(epoch)
    return [flat[i : i + order.global_batch] for i in range(0, len(flat), order.global_batch)]


def test_modality_length_order_groups_modalities_and_lengths():
    rng = random.Random(1)
    lengths = [rng.randint(5, 400) * rng.choice([1, -1]) for _ in range(203)]
    order = ModalityLengthOrder(lengths, batch_size=4, seed=3, world=2)
    for epoch in range(3):
        batches = _global_batches(order, epoch)
        flat = [i for b in batches for i in b]
        assert set(flat) == set(range(203))  # every sample, every epoch
        mixed = [b for b in batches if len({lengths[i] > 0 for i in b}) > 1]
        assert len(mixed) <= 2  # only the leftovers of the two modalities share a batch (LLaVA's rule)
    # length grouping: far less spread inside a micro-batch than in random micro-batches of the same size
    spread = [
        max(abs(lengths[i]) for i in b) - min(abs(lengths[i]) for i in b)
        for b in order.batches(0, order.per_epoch)
    ]
    rand = build_order("random", list(range(203)), 4, 3, 0, 2)
    rand_spread = [
        max(abs(lengths[i]) for i in b) - min(abs(lengths[i]) for i in b)
        for b in rand.batches(0, rand.per_epoch)
    ]
    assert sum(spread) / len(spread) < 0.5 * sum(rand_spread) / len(rand_spread)
    # the two ranks' micro-batches of one step carry similar token totals (split_to_even_chunks)
    for b in _global_batches(order, 0)[:10]:
        a, c = sum(abs(lengths[i]) for i in b[:4]), sum(abs(lengths[i]) for i in b[4:])
        assert abs(a - c) <= max(abs(lengths[i]) for i in b)


def test_modality_length_order_is_deterministic_and_resumable():
    lengths = [(-1) ** i * (i % 37 + 1) for i in range(101)]
    a = ModalityLengthOrder(lengths, 4, seed=7, rank=1, world=2)
    b = ModalityLengthOrder(lengths, 4, seed=7, rank=1, world=2)
    other = ModalityLengthOrder(lengths, 4, seed=8, rank=1, world=2)
    whole = list(a.batches(0, 3 * a.per_epoch))
    assert whole == list(b.batches(0, 3 * b.per_epoch))
    assert whole != list(other.batches(0, 3 * other.per_epoch))
    for pos in (0, 5, a.per_epoch, a.per_epoch + 3):  # a resumed run starts at a position, mid-epoch or not
        assert list(a.batches(pos, 3 * a.per_epoch)) == whole[pos:]
    rank0 = ModalityLengthOrder(lengths, 4, seed=7, rank=0, world=2)
    for x, y in zip(rank0.batches(0, a.per_epoch), a.batches(0, a.per_epoch)):
        assert not set(x) & set(y)  # ranks take disjoint halves of each global batch


def test_modality_lengths_follow_llava_sign_convention():
    records = json.loads(MIX.read_text())
    lengths = modality_lengths(records, num_image_tokens=576)
    assert [n > 0 for n in lengths] == [bool(image_paths(r)) for r in records]
    assert all(n > 576 for n in lengths if n > 0)


def test_recipe_switch_trains_on_the_mix_layout(image_folder, tmp_path):
    world = {"align": MIX, "instruct": MIX, "images": image_folder}
    rec = tiny_recipe(world, "torch", None, steps=(1, 3))
    rec["model"]["max_length"] = 1024
    stage = rec["stages"][1]
    stage.update(batch_size=2, grad_accum=1)
    stage["data"]["sampler"] = "modality_length"
    recipe = recipe_from_dict(rec)
    model = build_model(recipe.model, tmp_path, [MIX], seed=0)
    result = run_stage(model, recipe, recipe.stage("instruct"), tmp_path / "instruct")
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    rec["stages"][1]["data"]["sampler"] = "by_length"
    bad = recipe_from_dict(rec)
    with pytest.raises(ValueError, match="unknown 'by_length'"):
        run_stage(build_model(bad.model, tmp_path, [MIX], seed=0), bad, bad.stage("instruct"), tmp_path / "x")
