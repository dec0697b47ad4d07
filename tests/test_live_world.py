"""GeoWorld drawn on the fly (mllm.data.geoworld.live): determinism, held-out hygiene, true answers."""

from __future__ import annotations

import random
import re

import pytest
import torch

from mllm.chat import IGNORE_INDEX
from mllm.config import LiveWorldConfig, load_recipe
from mllm.data.geoworld import write_world
from mllm.data.geoworld.live import (
    LiveWorldDataset,
    existence_probes,
    heldout_keys,
    paraphrase,
    qa_turns,
    two_options,
)
from mllm.data.geoworld.render import render
from mllm.data.geoworld.sampling import pixel_key
from mllm.data.geoworld.scene import sample_scene
from mllm.tokenizer import ensure_image_token, train_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("w")
    write_world(
        out,
        seed=0,
        n=40,
        size=64,
        n_eval=16,
        mmvp_pairs=8,
        pope_questions=12,
        refcoco_n=8,
        mathverse_problems=2,
        mmvp_vlm_pairs=1,
    )
    return out


@pytest.fixture(scope="module")
def tok():
    corpus = ["What color is the circle? red", "Is there a blue square in the image? yes no (a) (b)"] * 20
    t = train_tokenizer(corpus, 400)
    ensure_image_token(t, "<image>")
    return t


def _dataset(tok, world=None, **kw):
    cfg = LiveWorldConfig(heldout=str(world) if world else None, **kw)
    return LiveWorldDataset(
        cfg,
        tok,
        "chatml",
        tok.convert_tokens_to_ids("<image>"),
        4,
        lambda ims: torch.zeros(len(ims), 3, 8, 8),
        4096,
    )


def test_samples_are_a_pure_function_of_seed_and_index(tok):
    a, b = _dataset(tok), _dataset(tok)
    assert torch.equal(a[7]["input_ids"], b[7]["input_ids"])
    assert not torch.equal(a[7]["input_ids"], a[8]["input_ids"])
    c = _dataset(tok, seed=2)
    assert pixel_key(render(a.scene(7)[0])) != pixel_key(render(c.scene(7)[0]))


def test_heldout_scenes_are_redrawn(tok, world):
    keys = heldout_keys(world)
    assert len(keys) >= 16 + 16  # eval + mmvp at least
    ds = _dataset(tok, world)
    # Pretend the first live scenes were held out: each must be replaced by a different one.
    first = [pixel_key(render(ds.scene(i)[0])) for i in range(5)]
    ds.excluded |= set(first)
    for i in range(5):
        assert pixel_key(render(ds.scene(i)[0])) not in ds.excluded
    assert ds.redrawn >= 5
    for i in range(200):  # and no live draw is ever one of the world's held-out images
        assert pixel_key(render(ds.scene(i)[0])) not in keys


def test_heldout_must_be_a_world(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="not a GeoWorld folder"):
        _dataset(tok, tmp_path)


def test_paraphrases_keep_the_answer():
    assert paraphrase("Which way is the arrow pointing?", "up") == (
        "Which direction is the arrow pointing?",
        "up",
    )
    assert paraphrase("Is the red star on the left or the right?", "left") == (
        "Is the red star on the left or the right side of the image?",
        "left",
    )
    assert paraphrase("Is the circle to the left of the square?", "yes") == (
        "Is the circle to the left or to the right of the square?",
        "left",
    )
    assert paraphrase("Is the circle to the left of the square?", "no")[1] == "right"
    assert paraphrase("Is the circle above the square?", "no")[1] == "below"
    assert paraphrase("What color is the circle?", "red") is None


def test_two_options_contain_the_answer_once():
    rng = random.Random(0)
    for cat, q, a in [
        ("position", "Is it on the left?", "left"),
        ("colour", "What color is it?", "red"),
        ("count", "How many?", "3"),
        ("existence", "Is there a star?", "no"),
    ]:
        for _ in range(20):
            mq, ma = two_options(cat, q, a, rng)
            opts = re.findall(r"\((a|b)\) (\w+)", mq)
            assert dict(opts)[ma.strip("()")] == a
            assert [o for _, o in opts].count(a) == 1


def test_multiple_choice_is_answered_by_letter_option_or_both(tok):
    """mc_reply: the same questions, drawn from the same stream, answered with the letter ("(b)"), the
    letter's option ("orange") or both ("orange (b)"); any other reply is refused."""
    n_mc = 0
    for seed in range(40):
        scene = sample_scene(random.Random(seed), 64, max_shapes=5)
        replies = {
            m: qa_turns(scene, random.Random(seed), LiveWorldConfig(mc_frac=1.0, turns=(6, 6), mc_reply=m))
            for m in ("letter", "option", "both")
        }
        assert len({tuple(q for q, _ in t) for t in replies.values()}) == 1
        for (q, letter), (_, word), (_, both) in zip(*replies.values()):
            opts = dict(re.findall(r"\((a|b)\) (\w+)", q))
            if not opts:
                assert letter == word == both  # not a two-option question (e.g. math)
                continue
            n_mc += 1
            assert opts[letter.strip("()")] == word and both == f"{word} {letter}"
    assert n_mc > 100
    with pytest.raises(ValueError, match="mc_reply"):
        _dataset(tok, mc_reply="word")


def test_existence_probes_are_true_and_balanced():
    for seed in range(50):
        rng = random.Random(seed)
        scene = sample_scene(rng, 64, max_shapes=5)
        probes = existence_probes(scene, rng, 4)
        assert sorted(a for _, a in probes) == ["no", "no", "yes", "yes"]
        for q, a in probes:
            obj = re.match(r"Is there an? (\w+ \w+) in the image\?", q)[1]
            assert (obj in scene.objects()) == (a == "yes")


def _near_miss(scene, obj: str) -> bool:
    colour, kind = obj.split()
    return kind in {sh.kind for sh in scene.shapes} or colour in {sh.color for sh in scene.shapes}


def _probe_stats(yes_share: float, near_share: float) -> tuple[float, float]:
    """Over 300 scenes' probes: the share answered "yes", and the share of "no" objects that are near
    misses (a present shape or colour); each answer checked true of its scene on the way."""
    yes = total = near = 0
    for seed in range(300):
        rng = random.Random(seed)
        scene = sample_scene(rng, 64, max_shapes=5)
        for q, a in existence_probes(scene, rng, 4, yes_share, near_share):
            obj = re.match(r"Is there an? (\w+ \w+) in the image\?", q)[1]
            assert (obj in scene.objects()) == (a == "yes"), (seed, q, a)
            yes += a == "yes"
            total += 1
            near += a == "no" and _near_miss(scene, obj)
    return yes / total, near / (total - yes)


def test_a_yes_heavy_mix_with_easy_negatives_is_what_it_asks_for():
    """`existence_yes` / `existence_near` (LLaVA-Instruct's yes-heavy mix with easy negatives, for a base
    with a "yes" bias): answers stay true, the yes share is the one asked for, and the "no" objects are
    near misses only as often as chance makes them, where the demo's mix makes half of them so on purpose."""
    yes_heavy, near_heavy = _probe_stats(0.9, 0.0)
    yes_demo, near_demo = _probe_stats(0.5, 0.5)
    assert 0.85 < yes_heavy < 0.95 and yes_demo == 0.5
    assert near_heavy < near_demo - 0.15
    rng = random.Random(0)  # the pool's existence question follows the same shares
    answers = [
        qa_turns(
            sample_scene(rng, 64, max_shapes=5),
            rng,
            LiveWorldConfig(existence=0, existence_yes=1.0, turns=(12, 12), mc_frac=0.0, paraphrase_frac=0.0),
        )
        for _ in range(60)
    ]
    existence = [a for turns in answers for q, a in turns if q.startswith("Is there")]
    assert existence and set(existence) == {"yes"}


def test_existence_shares_are_checked_when_the_recipe_loads():
    with pytest.raises(ValueError, match="existence_yes"):
        LiveWorldConfig(existence_yes=1.5)
    with pytest.raises(ValueError, match="existence_near"):
        LiveWorldConfig(existence_near=-0.1)


def _find(scene, phrase):
    """The one object an attribute phrase ("small red circle") names, or None."""
    words = phrase.split()
    hits = [
        s for s in scene.shapes if words[-1] == s.kind and all(w in (s.color, s.size) for w in words[:-1])
    ]
    return hits[0] if len(hits) == 1 else None


def test_spatial_paraphrases_match_the_scene():
    """Paraphrased left/right-of answers must agree with the scene's coordinates."""
    checked = 0
    for seed in range(150):
        rng = random.Random(seed)
        scene = sample_scene(rng, 64, max_shapes=5)
        cfg = LiveWorldConfig(paraphrase_frac=1.0, mc_frac=0.0, turns=(30, 30), existence=0)
        for q, a in qa_turns(scene, rng, cfg):
            m = re.match(r"Is the (.+) to the left or to the right of the (.+)\?", q)
            if not m:
                continue
            x, y = _find(scene, m[1]), _find(scene, m[2])
            if x is None or y is None:
                continue
            assert a == ("left" if x.x < y.x else "right"), (q, a)
            checked += 1
    assert checked > 20


def test_long_conversations_lose_whole_turns(tok):
    ds = _dataset(tok, turns=(10, 10))
    full = ds[3]
    ds.max_length = len(full["input_ids"]) - 1
    short = ds[3]
    n = len(short["input_ids"])
    assert n < len(full["input_ids"])
    assert torch.equal(short["input_ids"], full["input_ids"][:n])  # a prefix: whole turns dropped at the end
    assert (short["labels"] != IGNORE_INDEX).any()


def test_recipe_refuses_json_and_live_together(tmp_path):
    from mllm.families.mllm import conversation_task

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\nstages:\n  - {name: instruct, kind: instruct, data: {json: a.json, live: {n: 4}}}\n"
    )
    stage = load_recipe(recipe).stages[0]
    assert stage.data.live.n == 4

    class M:  # the check comes before the model is used
        pass

    with pytest.raises(ValueError, match="both set"):
        conversation_task(M(), stage, "chatml")


def test_unknown_live_key_is_refused(tmp_path):
    from mllm.config import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nstages:\n  - {name: i, kind: instruct, data: {live: {turnz: 3}}}\n")
    with pytest.raises(ConfigError, match="turnz"):
        load_recipe(recipe)


def test_curriculum_grows_scenes_and_needs_a_sequential_order(tok, tmp_path):
    from mllm.families.mllm import conversation_task

    ds = _dataset(tok, curriculum=100, max_shapes=5, math_frac=0.0)
    assert [ds.max_shapes(i) for i in (0, 19, 20, 99, 100, 10**6)] == [1, 1, 2, 5, 5, 5]
    assert all(len(ds.scene(i)[0].shapes) == 1 for i in range(20))
    assert max(len(ds.scene(i)[0].shapes) for i in range(100, 160)) > 2

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nstages:\n  - {name: i, kind: instruct, data: {live: {curriculum: 50}}}\n")

    class M:
        pass

    with pytest.raises(ValueError, match="sequential"):
        conversation_task(M(), load_recipe(recipe).stages[0], "chatml")


def test_sequential_order_is_index_order():
    from mllm.data.samplers import build_order

    order = build_order("sequential", list(range(10)), 4, seed=3)
    assert list(order.batches(0, 2)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_image_placement_after_puts_the_first_question_before_the_image(tok):
    image_id = tok.convert_tokens_to_ids("<image>")
    before = _dataset(tok)[5]["input_ids"].tolist()
    after = LiveWorldDataset(
        LiveWorldConfig(),
        tok,
        "chatml",
        image_id,
        4,
        lambda ims: torch.zeros(len(ims), 3, 8, 8),
        4096,
        image_placement="after",
    )[5]["input_ids"].tolist()
    assert sorted(before) == sorted(after) and before != after  # the same tokens, the image moved
    first_q = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(after)) if after[i : i + len(first_q)] == first_q) + len(first_q)
    assert before[start] == image_id and after[start] != image_id  # LLaVA's order vs question first
    assert after.index(image_id) > start
    with pytest.raises(ValueError, match="unknown image placement"):
        LiveWorldDataset(
            LiveWorldConfig(), tok, "chatml", image_id, 4, lambda ims: ims, 4096, image_placement="x"
        )


def test_grounded_looks_get_one_target_row_per_look(tok):
    """With a readout's look token and grid, each sample carries one referent-patch row per look, in turn
    order, also when `_encode` drops trailing turns to fit max_length."""
    import copy

    from mllm.data.conversations import Collator
    from mllm.data.geoworld.live import conversation as live_conversation
    from mllm.data.geoworld.live import qa_turns
    from mllm.data.geoworld.referents import look_target
    from mllm.readout import LOOK_TOKEN
    from mllm.tokenizer import ensure_look_token

    t = copy.deepcopy(tok)
    look = ensure_look_token(t, LOOK_TOKEN)
    for max_length in (4096, 120):
        ds = LiveWorldDataset(
            LiveWorldConfig(turns=(6, 6)),
            t,
            "chatml",
            t.convert_tokens_to_ids("<image>"),
            4,
            lambda ims: torch.zeros(len(ims), 3, 8, 8),
            max_length,
        )
        ds.look_token, ds.look_grid = LOOK_TOKEN, (2, 2)
        items = [ds[i] for i in range(6)]
        for i, it in enumerate(items):
            n = int((it["input_ids"] == look).sum())
            assert it["look_targets"].shape == (n, 4) and n >= 1
            scene, rng = ds.scene(i)
            conv = live_conversation(qa_turns(scene, rng, ds.cfg), ds.placement)
            want = [look_target(scene, c["value"], (2, 2)) for c in conv[::2]][:n]
            assert torch.equal(it["look_targets"], torch.stack(want))
        batch = Collator(t.pad_token_id)(items)
        assert batch["look_targets"].shape[0] == int((batch["input_ids"] == look).sum())


def test_grounding_turns_ask_refcocos_prompt_and_answer_the_named_objects_box():
    """What the RefCOCO benchmark asks (its prompt, a phrase naming one object), answered with that
    object's box in 0-1 of the image, which the benchmark's norm1 reading turns back into the box."""
    from mllm.data.geoworld.live import grounding_turns
    from mllm.data.geoworld.referents import referents
    from mllm.data.grounding import PROMPT
    from mllm.evaluation.extract import extract_box, iou

    head = PROMPT.split("{sentence}")[0]
    asked = 0
    for seed in range(60):
        rng = random.Random(seed)
        scene = sample_scene(rng, 64, min_shapes=2, max_shapes=5)
        for q, a in grounding_turns(scene, rng, 2):
            asked += 1
            assert q.startswith(head)
            (index,) = referents(scene, q[len(head) :])  # the phrase names exactly one object
            box = extract_box(a, "norm1", scene.width, scene.height)
            assert iou(box, scene.shapes[index].box) >= 0.8, (q, a, scene.shapes[index].box)
    assert asked >= 100  # nearly every object has a unique phrase


def test_grounding_turns_are_asked_only_when_configured(tok):
    from mllm.data.grounding import PROMPT

    head = PROMPT.split("{sentence}")[0]
    for grounding, want in ((0, 0), (1, 1)):
        cfg = LiveWorldConfig(grounding=grounding, paraphrase_frac=0.0, mc_frac=0.5)
        for seed in range(20):
            rng = random.Random(seed)
            scene = sample_scene(rng, 64, max_shapes=5)
            turns = qa_turns(scene, rng, cfg)
            assert sum(q.startswith(head) for q, _ in turns) == want  # never turned into multiple choice
    with pytest.raises(ValueError, match="grounding"):
        _dataset(tok, grounding=-1)
