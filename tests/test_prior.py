"""PRIOR: token weights from a text-only reference LM, their cache, and the `prior_ref` / `prior` stages."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_recipe, write_tiny_world
from torch import nn

from mllm import prior as P
from mllm.chat import IGNORE_INDEX, encode_conversation
from mllm.config import ConfigError, PriorConfig, load_recipe, recipe_from_dict
from mllm.data.conversations import Collator, ConversationDataset
from mllm.model import MultimodalLM
from mllm.training.runner import build_model, run_stage


class BigramLM(nn.Module):
    """A reference LM whose next-token distribution depends only on the previous token: P = probs[prev]."""

    def __init__(self, probs: torch.Tensor, bos: int = 0):
        super().__init__()
        self.logp = nn.Parameter(probs.clamp_min(1e-30).log(), requires_grad=False)
        self.config = SimpleNamespace(bos_token_id=bos, eos_token_id=None)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.logp[input_ids])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("prior-world"), n=16)


def _plain_batch(model: MultimodalLM, captions: list[str]):
    items = []
    for c in captions:
        conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": c}]
        enc = encode_conversation(
            conv, model.tokenizer, "plain", model.image_token_id, model.num_image_tokens, 1
        )
        items.append({"id": c, **enc, "pixel_values": torch.rand(1, 3, 32, 32)})
    return Collator(model.tokenizer.pad_token_id)(items)


def test_hand_computed_weights_on_a_bigram_reference():
    probs = torch.tensor(
        [
            [0.0, 0.5, 0.25, 0.25],  # after BOS (0)
            [0.0, 0.0, 0.9, 0.1],  # after 1
            [0.0, 0.2, 0.0, 0.8],  # after 2
            [0.0, 0.6, 0.4, 0.0],
        ]
    )  # after 3
    ref = BigramLM(probs)
    # row 0: prompt/image (-100), caption 1 2 3, then padding; row 1: caption 3 2, a gap, caption 1
    labels = torch.tensor(
        [
            [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX],
            [IGNORE_INDEX, 3, 2, IGNORE_INDEX, 1, IGNORE_INDEX],
        ]
    )
    ids = labels.clamp_min(0)
    alpha = 2.0
    w = P.token_weights(ref, ids, labels, alpha=alpha, floor=0.0, cap=1e9)
    # caption 1 2 3 behind BOS: P = 0.5, 0.9, 0.8
    raw = torch.tensor([(1 - 0.5) ** alpha, (1 - 0.9) ** alpha, (1 - 0.8) ** alpha], dtype=torch.float64)
    torch.testing.assert_close(w[0, 2:5], (raw * 3 / raw.sum()).float())
    # caption 3 2 behind BOS: P = 0.25, 0.4; the lone "1" after the gap is its own caption -> weight 1
    raw2 = torch.tensor([(1 - 0.25) ** alpha, (1 - 0.4) ** alpha], dtype=torch.float64)
    torch.testing.assert_close(w[1, 1:3], (raw2 * 2 / raw2.sum()).float())
    assert w[1, 4].item() == pytest.approx(1.0)
    # off-target positions carry 0; each caption sums to its length
    assert torch.all(w[labels == IGNORE_INDEX] == 0)
    assert w[0].sum().item() == pytest.approx(3.0) and w[1, 1:3].sum().item() == pytest.approx(2.0)

    # floor / cap act before normalisation: (0.5^2, 0.1^2, 0.2^2) clamped to [0.05, 0.2]
    wc = P.token_weights(ref, ids, labels, alpha=alpha, floor=0.05, cap=0.2)
    clamped = torch.tensor([0.2, 0.05, 0.05], dtype=torch.float64)
    torch.testing.assert_close(wc[0, 2:5], (clamped * 3 / clamped.sum()).float())


def test_alpha_zero_is_exactly_the_plain_loss(tiny_model):
    batch = _plain_batch(tiny_model, ["a large red circle", "blue", "a small blue triangle pointing up"])
    ref = P.reference_from(tiny_model.lm, P.PriorSettings(), len(tiny_model.tokenizer))
    w = P.token_weights(
        ref, batch["input_ids"], batch["labels"], alpha=0.0, start_id=P.start_token_id(tiny_model.tokenizer)
    )
    on = batch["labels"] != IGNORE_INDEX
    assert torch.equal(w, on.float())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    tiny_model.eval()
    plain = tiny_model(**inputs).loss
    weighted = tiny_model(**inputs, token_weights=w).loss
    assert torch.equal(plain, weighted)
    # alpha = 1: same normaliser, different weighting, and weights still sum to each caption's length
    w1 = P.token_weights(
        ref, batch["input_ids"], batch["labels"], alpha=1.0, start_id=P.start_token_id(tiny_model.tokenizer)
    )
    assert torch.all(w1[~on] == 0)
    torch.testing.assert_close(w1.sum(1), on.sum(1).float())
    assert not torch.equal(tiny_model(**inputs, token_weights=w1).loss, plain)


def _dataset(model: MultimodalLM, world) -> ConversationDataset:
    return ConversationDataset(
        world["align"],
        world["images"],
        model.tokenizer,
        "plain",
        model.image_token_id,
        model.num_image_tokens,
        model.tower.preprocess,
        model.meta.max_length,
    )


def test_cache_round_trip_stale_and_missing(tiny_model, world, tmp_path):
    ds = _dataset(tiny_model, world)
    s = P.PriorSettings(alpha=1.0)
    ref = P.reference_from(tiny_model.lm, s, len(tiny_model.tokenizer))
    cache = P.load_or_compute(ref, ds, s, tmp_path / "c", log=lambda *a: None)
    assert len(cache) == len(ds)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["fingerprint"]["alpha"] == 1.0 and manifest["fingerprint"]["template"] == "plain"

    pds = P.PriorDataset(ds, cache)
    for i in range(3):
        it = pds[i]
        on = it["labels"] != IGNORE_INDEX
        assert torch.all(it["token_weights"][~on] == 0)  # image and prompt positions
        assert it["token_weights"].sum().item() == pytest.approx(int(on.sum()), rel=1e-5)
        # the cached weights are those of a direct batched computation on the same sample
        direct = P.token_weights(
            ref,
            it["input_ids"][None],
            it["labels"][None],
            1.0,
            start_id=P.start_token_id(tiny_model.tokenizer),
        )[0]
        torch.testing.assert_close(it["token_weights"], direct)
    batch = Collator(tiny_model.tokenizer.pad_token_id)([pds[0], pds[1]])
    assert batch["token_weights"].shape == batch["labels"].shape

    # a different alpha: refused, naming alpha
    s2 = P.PriorSettings(alpha=0.5)
    with pytest.raises(P.StaleCacheError, match="stale cache.*alpha changed"):
        P.load_or_compute(ref, ds, s2, tmp_path / "c")
    # a changed reference LM: refused, naming it
    ref2 = copy.deepcopy(ref)
    with torch.no_grad():
        next(ref2.parameters()).add_(1e-3)
    with pytest.raises(P.StaleCacheError, match="stale cache.*reference LM changed"):
        P.load_or_compute(ref2, ds, s, tmp_path / "c")
    with pytest.raises(P.StaleCacheError, match="stale cache.*reference LM changed"):
        P.WeightCache(tmp_path / "c", P.fingerprint(tiny_model.tokenizer, ref2, s, "plain"))
    # a sample the cache does not know
    with pytest.raises(KeyError, match="'nope' is missing"):
        cache["nope"]


def _prior_recipe(prior, extra=None):
    tree = {
        "stages": [
            {"name": "prior_ref", "kind": "prior_ref"},
            {"name": "prior", "kind": "prior", "prior": prior},
        ]
    }
    if extra is not None:
        tree["extra"] = extra
    return tree


def test_settings_are_the_stages_typed_section():
    """One way to give PRIOR settings: the `prior` stage's `prior:` section, checked when the recipe loads."""
    r = recipe_from_dict(_prior_recipe({"alpha": 0.5, "cap": 3, "ref": "stage:prior_ref"}))
    s = r.stage("prior").prior
    assert (
        isinstance(s, PriorConfig)
        and s.alpha == 0.5
        and isinstance(s.cap, float)
        and math.isclose(s.cap, 3.0)
    )
    assert r.stage("prior_ref").prior is None  # the defaults, where the task reads it
    # an override addresses it like any other stage key
    assert (
        recipe_from_dict(_prior_recipe({}), ["stages.prior.prior.alpha=0.25"]).stage("prior").prior.alpha
        == 0.25
    )
    # an unknown key is refused at load, naming it and the known ones
    with pytest.raises(ConfigError, match=r"prior: unknown key\(s\) \['alhpa'\]; known: .*'alpha'"):
        recipe_from_dict(_prior_recipe({"alhpa": 1.0}))
    with pytest.raises(ConfigError, match="floor <= cap"):
        recipe_from_dict(_prior_recipe({"floor": 2.0, "cap": 1.0}))
    with pytest.raises(ConfigError, match="not an earlier stage"):
        recipe_from_dict(_prior_recipe({"ref": "stage:instruct"}))
    # the old free-form spelling is refused with where the settings moved
    with pytest.raises(ConfigError, match="extra.prior is no longer read.*prior"):
        recipe_from_dict(_prior_recipe({}, extra={"prior": {"alpha": 1.0}}))
    # no module state: nothing in mllm.prior holds settings between runs
    assert not hasattr(P, "_SETTINGS") and not hasattr(P, "configure")
    # `stage:NAME` resolves against the run folder
    assert P.resolve_ref(s, "/runs/x").ref == "/runs/x/prior_ref/final/lm"
    assert P.resolve_ref(replace(s, ref=None), "/runs/x").ref is None


def test_packaged_prior_recipes_carry_typed_settings():
    tiny = load_recipe("prior-tiny").stage("prior").prior
    assert (tiny.alpha, tiny.floor, tiny.cap, tiny.ref) == (1.0, 0.0, 1.0e9, "stage:prior_ref")
    assert load_recipe("prior-3b").stage("prior").prior.alpha == 1.0


def test_a_sidecar_settings_file_is_refused(tmp_path):
    (tmp_path / "align.prior.json").write_text(json.dumps({"alpha": 0.5}))
    with pytest.raises(ConfigError, match="no longer read from a file beside the data.*stage 'prior'"):
        P.refuse_sidecar("prior", tmp_path / "align.json")
    P.refuse_sidecar("prior", tmp_path / "other.json")  # no sidecar: nothing to say


def test_a_prior_section_on_another_stage_kind_is_refused(tmp_path):
    from mllm.training.runner import train_recipe

    bad = recipe_from_dict({"stages": [{"name": "a", "kind": "align", "prior": {"alpha": 1.0}}]})
    with pytest.raises(ConfigError, match="stage 'a': a `prior:` section is set but its kind 'align'"):
        train_recipe(bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_prior_ref_then_prior_stage_trains_what_it_declares(world, tmp_path):
    rec = tiny_recipe(world, "torch", None, steps=(2, 2))
    rec["stages"] = [
        {
            "name": "prior_ref",
            "kind": "prior_ref",
            "data": {"json": str(world["align"]), "images": str(world["images"])},
            "lr": 3e-3,
            "batch_size": 8,
            "max_steps": 2,
            "warmup_ratio": 0.0,
        },
        {
            "name": "prior",
            "kind": "prior",
            "data": {"json": str(world["align"]), "images": str(world["images"])},
            "lr": 3e-3,
            "batch_size": 8,
            "max_steps": 2,
            "warmup_ratio": 0.0,
        },
    ]
    recipe = recipe_from_dict(rec)
    model = build_model(recipe.model, tmp_path, [world["align"]], seed=0)

    # prior_ref: text only ([BOS] + caption, no image), only the LM trains
    ref_ds = P.CaptionTextDataset(_dataset(model, world))
    item = ref_ds[0]
    assert item["pixel_values"] is None and model.image_token_id not in item["input_ids"].tolist()
    assert item["input_ids"][0].item() == P.start_token_id(model.tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_stage(model, recipe, recipe.stage("prior_ref"), tmp_path / "prior_ref")
    mid = MultimodalLM.from_pretrained(tmp_path / "prior_ref" / "final")
    after = mid.state_dict()
    for k, v in before.items():
        assert (not torch.equal(v, after[k])) == k.startswith("lm."), k

    # prior: the reference is the prior_ref LM (the model's own lm at stage start); only the projector trains
    rec["stages"][1]["prior"] = {"alpha": 1.0, "cache": str(tmp_path / "cache")}
    recipe = recipe_from_dict(rec)
    before = {k: v.clone() for k, v in mid.state_dict().items()}
    result = run_stage(mid, recipe, recipe.stage("prior"), tmp_path / "prior")
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert P.cache_exists(tmp_path / "cache")
    after = MultimodalLM.from_pretrained(tmp_path / "prior" / "final").state_dict()
    for k, v in before.items():
        assert (not torch.equal(v, after[k])) == k.startswith("projector."), k
    # the cache was made with the prior_ref LM: a re-run of the stage reuses it, a new alpha is refused
    recipe = recipe_from_dict(rec, ["stages.prior.prior.alpha=0.5"])
    with pytest.raises(P.StaleCacheError, match="alpha changed"):
        run_stage(
            MultimodalLM.from_pretrained(tmp_path / "prior_ref" / "final"),
            recipe,
            recipe.stage("prior"),
            tmp_path / "prior2",
        )


def test_recipe_reference_from_a_stage_and_alignment_from_the_base(world, tmp_path):
    """`ref: stage:prior_ref` + `init`: the MLLM aligns from the base LM while the weights come from the
    caption-tuned reference trained earlier in the same run."""
    from mllm.training.runner import train_recipe

    data = {"json": str(world["align"]), "images": str(world["images"])}
    rec = tiny_recipe(world, "torch", None, steps=(2, 2))
    rec["stages"] = [
        {"name": "base", "kind": "align", "data": data, "lr": 3e-3, "batch_size": 8, "max_steps": 1},
        {"name": "prior_ref", "kind": "prior_ref", "data": data, "lr": 3e-3, "batch_size": 8, "max_steps": 2},
        {
            "name": "prior",
            "kind": "prior",
            "init": "base",
            "data": data,
            "lr": 3e-3,
            "batch_size": 8,
            "max_steps": 1,
            "prior": {"alpha": 1.0, "ref": "stage:prior_ref"},
        },
    ]
    run = tmp_path / "run"
    logs: list[str] = []
    train_recipe(recipe_from_dict(rec), run, log=logs.append)
    base_lm = MultimodalLM.from_pretrained(run / "base" / "final").lm.state_dict()
    ref_lm = MultimodalLM.from_pretrained(run / "prior_ref" / "final").lm.state_dict()
    prior_lm = MultimodalLM.from_pretrained(run / "prior" / "final").lm.state_dict()
    assert all(torch.equal(base_lm[k], prior_lm[k]) for k in base_lm)  # started from `base`; lm frozen
    assert not all(torch.equal(ref_lm[k], prior_lm[k]) for k in ref_lm)
    ref_fp = P.model_fingerprint(MultimodalLM.from_pretrained(run / "prior_ref" / "final").lm)
    made_with = [
        json.loads(p.read_text())["fingerprint"]["reference LM"]
        for p in world["align"].parent.glob("prior_cache/*/manifest.json")
    ]
    assert ref_fp in made_with

    bad = dict(rec, stages=[dict(rec["stages"][2], init="later", prior={"alpha": 1.0})])
    with pytest.raises(ValueError, match="not an earlier stage"):
        train_recipe(recipe_from_dict(bad), tmp_path / "bad", log=logs.append)
