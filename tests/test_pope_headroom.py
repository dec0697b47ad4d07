"""scripts/pope_headroom.py: the harder POPE-style sets behind docs/evidence.md's "hallucination left to
cut" ask what they say (binding negatives are absent yet built from what is present) and load as POPE."""

from __future__ import annotations

import random

from scripts_loader import load_script

from mllm.evaluation.benchmarks.pope import load


def _script():
    return load_script("pope_headroom")


def test_binding_negatives_are_absent_but_made_of_a_present_colour_and_shape():
    h = _script()
    present = {"red square", "blue circle", "green star"}
    for seed in range(20):
        negs = h.binding_negatives(present, 3, random.Random(seed))
        assert len(set(negs)) == 3
        for obj in negs:
            colour, kind = obj.split(" ", 1)
            assert obj not in present
            assert any(p.startswith(colour + " ") for p in present)
            assert any(p.endswith(" " + kind) for p in present)


def test_each_variant_is_a_balanced_pope_set_about_its_images(tmp_path):
    h = _script()
    for name, draw in (("crowded", h._crowded), ("mosaic", h._mosaic)):
        root = h.write_variant(tmp_path / name, 0, 4, draw)
        items = load(root)
        assert {it.meta["split"] for it in items} == {"random", "adversarial"}
        assert len(items) == 2 * 4 * 6
        assert sum(it.meta["label"] == "yes" for it in items) == len(items) // 2
        assert all(it.image.is_file() for it in items)
        _, present = draw(0, 0)
        asked = [it for it in items if it.meta["image"] == "000000.png"]
        for it in asked:
            obj = it.prompt.removeprefix("Is there ").removesuffix(" in the image?").split(" ", 1)[1]
            assert (obj in present) == (it.meta["label"] == "yes")
