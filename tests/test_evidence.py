"""`mllm evidence`: the statistics say what the data can and cannot tell, the per-item units are made from
records shaped as the scorers write them, the claims are well-formed, an arm trains only what its claim
changes, and a claim runs end to end (quick sizes), writes its table and figure, and re-runs as a report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm.evaluation.benchmarks import get_benchmark
from mllm.evaluation.benchmarks.core import Item
from mllm.evidence import claims as C
from mllm.evidence.stats import (
    OPPOSITE,
    REDUCERS,
    REPRODUCES,
    UNDIRECTED,
    UNRESOLVED,
    Interval,
    Table,
    bootstrap_mean,
    metric_value,
    paired_bootstrap,
    table_from_rows,
    verdict,
)
from mllm.evidence.units import UNITS, units_for


def _acc_table(correct: list[int], prefix: str = "q") -> Table:
    return table_from_rows([{"id": f"{prefix}{i}", "correct": c} for i, c in enumerate(correct)], ["correct"])


def _seeds(rates: list[float], n: int = 300, seed: int = 0) -> list[Table]:
    rng = np.random.default_rng(seed)
    return [_acc_table((rng.random(n) < r).astype(int).tolist()) for r in rates]


# ---------------------------------------------------------------- statistics


def test_identical_arms_differ_by_zero_and_cannot_resolve():
    ref = _seeds([0.6, 0.6, 0.6])
    iv = paired_bootstrap(ref, ref, "accuracy")
    assert iv.diff == 0 and iv.low == 0 and iv.high == 0
    assert verdict(iv, +1) == UNRESOLVED


def test_a_clear_gain_reproduces_and_its_opposite_claim_is_contradicted():
    ref, arm = _seeds([0.5] * 3, seed=1), _seeds([0.8] * 3, seed=2)
    iv = paired_bootstrap(ref, arm, "accuracy")
    assert 20 < iv.diff < 40 and iv.low > 10
    assert verdict(iv, +1) == REPRODUCES
    assert verdict(iv, -1) == OPPOSITE
    assert verdict(iv, 0) == UNDIRECTED


def test_seeds_that_disagree_leave_the_claim_unresolved_though_each_seed_is_decisive():
    """Per seed the arm is 20 points up, 20 down, 20 up (each far outside item noise): an items-only
    interval would call this a gain; resampling seeds must not."""
    ref = _seeds([0.5, 0.5, 0.5], n=400, seed=3)
    arm = _seeds([0.7, 0.3, 0.7], n=400, seed=4)
    iv = paired_bootstrap(ref, arm, "accuracy")
    assert iv.low < 0 < iv.high
    assert verdict(iv, +1) == UNRESOLVED


def test_the_pairing_uses_the_same_items_for_both_arms():
    """Arms that differ on exactly 10 of 1,000 items (always in the arm's favour) resolve, although
    the items' own spread (50% accuracy) would swamp 1 point in an unpaired comparison."""
    rng = np.random.default_rng(5)
    base = (rng.random(1000) < 0.5).astype(int)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:10]] = 1
    iv = paired_bootstrap([_acc_table(base.tolist())], [_acc_table(better.tolist())], "accuracy")
    assert iv.diff == pytest.approx(1.0)
    assert iv.low > 0


def test_arms_on_different_items_are_refused():
    with pytest.raises(ValueError, match="different items"):
        paired_bootstrap([_acc_table([1, 0, 1])], [_acc_table([1, 0, 1], prefix="x")], "accuracy")


def test_f1_and_yes_ratio_match_the_pope_scorer():
    from mllm.evaluation.benchmarks.pope import _split_metrics

    preds = ["yes", "yes", "no", "no", "yes", None, "no", "yes"]
    labels = ["yes", "no", "no", "yes", "yes", "yes", "no", "no"]
    rows = [
        {
            "id": str(i),
            "correct": int(p == y),
            "yes": int(p == "yes"),
            "tp": int(p == "yes" and y == "yes"),
            "fp": int(p == "yes" and y == "no"),
            "fn": int(p != "yes" and y == "yes"),
        }
        for i, (p, y) in enumerate(zip(preds, labels))
    ]
    t = table_from_rows(rows, ["correct", "yes", "tp", "fp", "fn"])
    want = _split_metrics(preds, labels)
    assert metric_value(t, "f1") == pytest.approx(want["f1"])
    assert metric_value(t, "yes_ratio") == pytest.approx(want["yes_ratio"])
    assert metric_value(t, "accuracy") == pytest.approx(want["accuracy"])


def test_an_arms_interval_holds_its_mean():
    tables = _seeds([0.7, 0.72, 0.68])
    iv = bootstrap_mean(tables, "accuracy")
    assert iv.low < iv.diff < iv.high
    assert isinstance(iv, Interval) and iv.seeds == 3 and iv.items == 900


# ---------------------------------------------------------------- units from real-shaped records


def _pope_items(tmp_path: Path) -> list[Item]:
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    rows = [("adversarial", 1, "yes"), ("adversarial", 2, "no"), ("random", 1, "no"), ("random", 2, "yes")]
    return [
        Item(
            id=f"{s}/{q}",
            prompt="Is there a red circle in the image?",
            image=img,
            meta={"split": s, "question_id": q, "label": y, "image": "x.png"},
        )
        for s, q, y in rows
    ]


def test_pope_units_carry_what_f1_needs(tmp_path):
    items = _pope_items(tmp_path)
    responses = {"adversarial/1": "Yes.", "adversarial/2": "yes", "random/1": "No", "random/2": "It is not."}
    metrics, records = get_benchmark("pope").score(items, responses)
    rows = units_for("pope", records, tmp_path)
    adv = table_from_rows(
        [r for r in rows if r["group"] == "adversarial"], ["correct", "yes", "tp", "fp", "fn"]
    )
    assert metric_value(adv, "f1") == pytest.approx(metrics["adversarial"]["f1"])
    assert metric_value(adv, "accuracy") == pytest.approx(metrics["adversarial"]["accuracy"])


def test_mmvp_units_are_pairs_grouped_by_pattern(tmp_path):
    """MMVP's records, one per question (Index 1..4 as strings, as the scorer writes them): a pair is
    right only when both are; the world's patterns.json names each pair's pattern."""
    (tmp_path / "patterns.json").write_text(
        json.dumps({"1": "color", "2": "color", "3": "count", "4": "count"})
    )
    records = [
        {"id": "1", "correct": True},
        {"id": "2", "correct": True},
        {"id": "3", "correct": True},
        {"id": "4", "correct": False},
    ]
    rows = units_for("mmvp", records, tmp_path)
    assert rows == [
        {"id": "1-2", "group": "color", "correct": 1},
        {"id": "3-4", "group": "count", "correct": 0},
    ]


def test_retrieval_units_read_the_rank_of_the_first_right_answer():
    records = [
        {"id": "a", "direction": "i2t", "rank_of_first_right": 1},
        {"id": "b", "direction": "i2t", "rank_of_first_right": 4},
        {"id": "c", "direction": "t2i", "rank_of_first_right": None},
    ]
    t = table_from_rows(units_for("retrieval", records, Path(".")), ["r1", "r5"])
    assert metric_value(t, "R@1") == pytest.approx(100 / 3)
    assert metric_value(t, "R@5") == pytest.approx(200 / 3)


# ---------------------------------------------------------------- the claims


@pytest.mark.parametrize("name", list(C.CLAIMS))
def test_every_claim_is_well_formed(name):
    claim = C.CLAIMS[name]
    arms = {a.name for a in claim.arms}
    assert len(arms) == len(claim.arms) >= 2
    assert claim.budgets
    for comp in claim.comparisons:
        assert comp.arm in arms and comp.reference in arms and comp.arm != comp.reference
        assert comp.measure.bench in claim.benches and comp.measure.bench in UNITS
        assert comp.measure.metric in REDUCERS and comp.expect in (-1, 0, 1)
    if claim.level == "encoder":
        assert all(a.recipe for a in claim.arms)


def test_a_prior_arm_replaces_align_and_shares_only_the_stages_before_it(tmp_path):
    from mllm.evidence.runner import link_shared, mllm_recipe

    base = tmp_path / "base"
    budget = C.PRIOR.budgets[0]
    ntp = mllm_recipe(C.PRIOR.arm("ntp"), base, 0, budget, quick=True)
    prior = mllm_recipe(C.PRIOR.arm("prior"), base, 0, budget, quick=True)
    reference = mllm_recipe(None, base, 0, budget, quick=True)
    assert [s.name for s in prior.stages] == ["lm_pretrain", "tower_warmup", "prior_ref", "prior", "instruct"]
    assert ntp.stages[3].prior.alpha == 0.0 and prior.stages[3].prior.alpha == 1.0
    assert prior.stages[3].init == "tower_warmup"
    for stage in reference.stages:  # the base run, finished
        (base / "run" / stage.name / "final").mkdir(parents=True)
    shared = link_shared(prior, reference, base / "run", tmp_path / "arm")
    assert shared == ["lm_pretrain", "tower_warmup"]
    assert (tmp_path / "arm" / "tower_warmup").is_symlink()
    assert not (tmp_path / "arm" / "instruct").exists()
    # the reference arm of a decoding-only claim is the base itself, every stage linked
    same = link_shared(reference, reference, base / "run", tmp_path / "same")
    assert same == [s.name for s in reference.stages]


def test_a_budget_override_reaches_only_the_stages_an_arm_has(tmp_path):
    from mllm.evidence.runner import mllm_recipe

    big = C.PRIOR.budgets[1]
    r = mllm_recipe(C.PRIOR.arm("prior"), tmp_path, 0, big, quick=False)
    steps = {s.name: s.max_steps for s in r.stages}
    assert steps["instruct"] == 840 and steps["prior"] == 60 and "align" not in steps


def _blocked() -> C.Claim:
    return replace(C.AGLA, name="blocked-agla", blocked="its decoder is not written yet")


def test_a_blocked_claim_refuses_to_run_and_says_why(tmp_path):
    from mllm.evidence.runner import BlockedClaim, run_claim

    with pytest.raises(BlockedClaim, match="decoder is not written"):
        run_claim(_blocked(), [0], tmp_path / "blocked", quick=True)
    assert not (tmp_path / "blocked").exists()  # nothing built or trained under its name


# ---------------------------------------------------------------- end to end (quick sizes)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Quick demo bases, shared by the end-to-end tests below (each claim builds what is missing)."""
    return tmp_path_factory.mktemp("bases")


def test_agla_runs_end_to_end_and_a_rerun_is_a_report(tmp_path, bases):
    from mllm.evidence.runner import run_claim

    out = tmp_path / "agla"
    summary = run_claim(C.AGLA, [0], out, bases=bases, quick=True, log=lambda *_: None)
    table = json.loads((out / "b0" / "table.json").read_text())
    assert (out / "b0" / "figure.png").stat().st_size > 1000
    md = (out / "b0" / "table.md").read_text()
    assert "agla - greedy: pope/adversarial accuracy" in md and "mllm evidence agla --seeds 0" in md
    assert table["cost"]["greedy"]["shared_with_base"] == ["lm_pretrain", "tower_warmup", "align", "instruct"]
    assert set(table["measures"]["pope/adversarial accuracy"]) == {"greedy", "agla"}
    assert summary["levels"][0]["verdicts"]
    evals = sorted((out / "b0").rglob("eval/*.json"))
    stamps = [p.stat().st_mtime_ns for p in evals]
    again = run_claim(C.AGLA, [0], out, bases=bases, quick=True, log=lambda *_: None)
    assert [p.stat().st_mtime_ns for p in evals] == stamps  # nothing re-evaluated
    assert again["levels"] == summary["levels"]
    from mllm.evidence.report import summarize

    overview = summarize(tmp_path)
    assert overview.count("| agla | agla - greedy:") == len(C.AGLA.comparisons)
    acc = table["measures"]["pope/adversarial accuracy"]
    means = f"| {acc['agla']['mean']:.1f} / {acc['greedy']['mean']:.1f} |"
    assert any(
        row.startswith("| agla | agla - greedy: pope/adversarial accuracy |") and means in row
        for row in overview.splitlines()
    )


def test_a_claim_on_a_base_variant_builds_it_once_and_its_arms_are_that_model(tmp_path, bases):
    """agla-weak: the weak-yes base (the demo's instruct shortened, on a yes-heavy existence mix) is built
    once per seed beside the demo's run, the stages before instruct linked from it, and both arms are that
    model, linked, not the demo's."""
    from mllm.config import load_recipe
    from mllm.evidence.runner import run_claim

    out = tmp_path / "agla-weak"
    run_claim(C.AGLA_WEAK, [0], out, bases=bases, quick=True, log=lambda *_: None)
    variant = bases / "s0" / "variants" / "weak-yes"
    cost = json.loads((variant / "cost.json").read_text())
    assert cost["shared_with_base"] == ["lm_pretrain", "tower_warmup", "align"]
    assert list(cost["stages"]) == ["instruct"] and cost["stages"]["instruct"]["steps"] > 0
    assert (variant / "run" / "align").is_symlink() and not (variant / "run" / "instruct").is_symlink()
    saved = load_recipe(variant / "run" / "recipe.yaml")
    live = saved.stage("instruct").data.live
    assert (live.existence_yes, live.existence_near, live.existence) == (0.9, 0.0, 4)
    assert saved.stage("instruct").max_steps < 210  # the quick sizes come after the variant's steps
    assert saved.extra["world"] == str(bases / "s0" / "world")  # the demo's world and held-out sets
    table = json.loads((out / "b0" / "table.json").read_text())
    for arm in ("greedy", "agla"):
        assert table["cost"][arm]["shared_with_base"] == ["lm_pretrain", "tower_warmup", "align", "instruct"]
        linked = out / "b0" / arm / "s0" / "run" / "instruct"
        assert linked.resolve() == (variant / "run" / "instruct").resolve()
    stamp = (variant / "cost.json").stat().st_mtime_ns
    run_claim(C.AGLA_WEAK, [0], tmp_path / "again", bases=bases, quick=True, log=lambda *_: None)
    assert (variant / "cost.json").stat().st_mtime_ns == stamp  # built once, shared
    # a variant whose overrides changed under the same name is refused, not silently reused
    from mllm.evidence.runner import ensure_variant

    changed = replace(C.WEAK_YES, overrides=(*C.WEAK_YES.overrides, "stages.instruct.lr=5.0e-4"))
    with pytest.raises(
        ValueError, match=r"trained under other settings than it is asked now: stages\.instruct\.lr"
    ):
        ensure_variant(changed, bases / "s0", 0, True, lambda *_: None)


def test_a_budget_of_more_pope_items_reuses_the_arms_and_asks_a_larger_set_that_starts_with_the_worlds(
    tmp_path, bases
):
    """agla-weak's second budget trains nothing new: each arm links the first budget's run (its cost says
    where it was trained) and answers a POPE set written once beside the world, twice the world's at quick
    sizes, whose first questions are the world's own."""
    from mllm.evidence.runner import run_claim

    out = tmp_path / "agla-weak"
    quiet = dict(bases=bases, quick=True, log=lambda *_: None)
    run_claim(C.AGLA_WEAK, [0], out, **quiet)
    run_claim(C.AGLA_WEAK, [0], out, budget=1, **quiet)
    world_pope = bases / "s0" / "world" / "pope"
    n = json.loads((bases / "s0" / "world" / "manifest.json").read_text())["params"]["pope_questions"]
    larger = bases / "s0" / "heldout" / f"pope-{2 * n}" / "pope"
    for split in ("random", "popular", "adversarial"):
        rows = (larger / f"geoworld_pope_{split}.json").read_text().splitlines()
        assert len(rows) == 2 * n
        assert rows[:n] == (world_pope / f"geoworld_pope_{split}.json").read_text().splitlines()
    for arm in ("greedy", "agla"):
        first, second = out / "b0" / arm / "s0", out / "b1" / arm / "s0"
        cost = json.loads((second / "cost.json").read_text())
        assert cost["trained_at"] == str(first)
        assert (second / "run").resolve() == (first / "run").resolve()
        units = [json.loads((d / "eval" / "pope.json").read_text())["units"] for d in (first, second)]
        assert len(units[1]) == 2 * len(units[0])
        assert {u["id"] for u in units[0]} < {u["id"] for u in units[1]}
    table = json.loads((out / "b1" / "table.json").read_text())
    assert table["cost"]["agla"]["trained_at"] == ["b0"]
    assert table["measures"]["pope/adversarial accuracy"]["agla"]["items_per_seed"] == [2 * n]
    assert "(trained at b0, reused)" in (out / "b1" / "table.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert [lv["budget"] for lv in summary["levels"]] == [0, 1]
    # each evaluation names the set it answered; one from another set is refused, not mixed into the table
    path = out / "b1" / "agla" / "s0" / "eval" / "pope.json"
    done = json.loads(path.read_text())
    assert done["data"] == f"heldout/pope-{2 * n}/pope"
    assert json.loads((out / "b0" / "agla" / "s0" / "eval" / "qa.json").read_text())["data"] == "world"
    path.write_text(json.dumps({**done, "data": "world/pope"}))
    with pytest.raises(ValueError, match="answered world/pope, but this budget asks heldout/pope"):
        run_claim(C.AGLA_WEAK, [0], out, budget=1, **quiet)


def test_a_budget_that_only_enlarges_a_held_out_set_trains_exactly_what_the_budget_before_it_did():
    """Every budget with a larger held-out set follows one whose arms it reuses: the same recipe for every
    arm, so reuse_earlier links that run instead of training the arm again."""
    from mllm.evidence.runner import mllm_recipe

    enlarging = [(c, k) for c in C.CLAIMS.values() for k, b in enumerate(c.budgets) if b.held_out]
    assert {c.name for c, _ in enlarging} >= {"agla-weak", "prior-weak", "mof", "tips-qa"}
    for claim, k in enlarging:
        assert k > 0 and claim.level == "mllm"
        extras = {ex.name: f"extras/{ex.name}" for ex in claim.extras}
        for arm in claim.arms:
            now, before = (
                mllm_recipe(arm, Path("b"), 0, claim.budgets[j], False, extras, claim.base)
                for j in (k, k - 1)
            )
            assert (now.model, now.engine, now.stages) == (before.model, before.engine, before.stages), (
                claim.name,
                arm.name,
            )


def test_a_budget_on_a_variant_states_its_steps_and_the_variant_the_rest():
    """prior-weak: PRIOR's stages on the weak-yes base; its larger budget doubles PRIOR's alignment and
    leaves the variant's instruct (210 steps, the yes-heavy mix) as it is."""
    from mllm.evidence.runner import mllm_recipe

    for level, prior_steps in ((0, 30), (1, 60), (2, 60)):
        r = mllm_recipe(
            C.PRIOR_WEAK.arm("prior"), Path("b"), 0, C.PRIOR_WEAK.budgets[level], False, variant=C.WEAK_YES
        )
        steps = {s.name: s.max_steps for s in r.stages}
        assert steps == {
            "lm_pretrain": 100,
            "tower_warmup": 400,
            "prior_ref": 60,
            "prior": prior_steps,
            "instruct": 210,
        }
        assert r.stage("instruct").data.live.existence_yes == 0.9


def test_the_prior_sweep_arms_differ_from_plain_ntp_by_alpha_alone():
    """prior-weak sweeps PRIOR's alpha (0.5, 1, 2), each against NTP: every arm's recipe must be NTP's but
    for the token weights' exponent, or a sweep would measure something else too; and every sweep arm is
    compared with NTP on the paper's side (POPE up) as alpha 1 is."""
    from mllm.evidence.runner import mllm_recipe

    budget = C.PRIOR_WEAK.budgets[1]

    def recipe(name: str):
        return mllm_recipe(C.PRIOR_WEAK.arm(name), Path("b"), 0, budget, False, variant=C.WEAK_YES)

    ntp = recipe("ntp")
    alphas = {}
    for arm in C.PRIOR_WEAK.arms:
        r = recipe(arm.name)
        alphas[arm.name] = r.stage("prior").prior.alpha
        assert replace(r.stage("prior"), prior=ntp.stage("prior").prior) == ntp.stage("prior")
        assert [s for s in r.stages if s.name != "prior"] == [s for s in ntp.stages if s.name != "prior"]
        assert r.model == ntp.model and r.engine == ntp.engine
    assert alphas == {"ntp": 0.0, "prior05": 0.5, "prior": 1.0, "prior2": 2.0}
    pope_up = {
        c.arm
        for c in C.PRIOR_WEAK.comparisons
        if c.reference == "ntp"
        and c.measure == C.Measure("pope", "accuracy", "adversarial")
        and c.expect == 1
    }
    assert pope_up == {"prior05", "prior", "prior2"}
    # the demo-base claim keeps its two arms (POPE at its ceiling there: nothing for a sweep to show)
    assert [a.name for a in C.PRIOR.arms] == ["ntp", "prior"]


def test_a_mof_arm_is_the_base_with_a_dino_tower_grafted_on(tmp_path, bases):
    """The fused arms link the base's first stages, start align from its warmed-up model with the
    claim's DINO tower attached, and train the same stages as the base; the CLIP arm is the base."""
    from mllm.evidence.runner import run_claim
    from mllm.model import MultimodalLM

    out = tmp_path / "mof"
    run_claim(C.MOF, [0], out, bases=bases, quick=True, log=lambda *_: None)
    table = json.loads((out / "b0" / "table.json").read_text())
    assert table["cost"]["clip"]["shared_with_base"] == ["lm_pretrain", "tower_warmup", "align", "instruct"]
    assert table["cost"]["add50"]["shared_with_base"] == ["lm_pretrain", "tower_warmup (+ fusion)"]
    assert table["cost"]["add50"]["steps"] == {"align": 3, "instruct": 8}
    fused = MultimodalLM.from_pretrained(out / "b0" / "add50" / "s0" / "run" / "instruct" / "final")
    assert fused.meta.fusion["alpha"] == 0.5 and fused.readout is not None
    warm = MultimodalLM.from_pretrained(bases / "s0" / "run" / "tower_warmup" / "final")
    graft = MultimodalLM.from_pretrained(out / "b0" / "add50" / "s0" / "run" / "tower_warmup" / "final")
    for name, p in warm.projector.state_dict().items():  # the grafted start keeps the warm-up's projector
        assert torch.equal(p, graft.projector.state_dict()[name])
    # interleaved: the warm-up's projector is the first stream's, the DINO stream's starts silent, and
    # the token budget grows by the DINO positions
    start = MultimodalLM.from_pretrained(out / "b0" / "inter" / "s0" / "run" / "tower_warmup" / "final")
    for name, p in warm.projector.state_dict().items():
        assert torch.equal(p, start.projector[0].state_dict()[name])
    assert not start.projector[1][-1].weight.any()
    inter = MultimodalLM.from_pretrained(out / "b0" / "inter" / "s0" / "run" / "instruct" / "final")
    assert inter.num_image_tokens == 2 * warm.num_image_tokens and inter.projector[1][-1].weight.any()
    assert inter.meta.max_length == warm.meta.max_length + warm.num_image_tokens
    assert table["cost"]["inter"]["steps"] == {"align": 3, "instruct": 8}
    # inter_look: the same graft, its look pooling both streams (recorded in the model's fusion)
    look = MultimodalLM.from_pretrained(out / "b0" / "inter_look" / "s0" / "run" / "instruct" / "final")
    assert look.meta.fusion["look"] == "both" and inter.meta.fusion["look"] == "first"
    assert table["cost"]["inter_look"]["shared_with_base"] == ["lm_pretrain", "tower_warmup (+ fusion)"]


def test_a_svemath_arm_is_the_base_with_a_geometric_encoder_and_a_silent_router_grafted_on(tmp_path, bases):
    """svemath: the geometric encoder is an extra built around the base's model (trained once per seed);
    the router arms start from the base's warmed-up model with it attached, keep its projector and
    readout, answer exactly as it did at the graft, and train the router in align and instruct."""
    from mllm.evidence.runner import run_claim
    from mllm.model import MultimodalLM

    out = tmp_path / "svemath"
    run_claim(C.SVE, [0], out, bases=bases, quick=True, log=lambda *_: None)
    geo = bases / "s0" / "extras" / "geo" / "geoglip" / "final" / "geo"
    assert (geo / "geo_config.json").is_file()
    table = json.loads((out / "b0" / "table.json").read_text())
    assert table["cost"]["clip"]["shared_with_base"] == ["lm_pretrain", "tower_warmup", "align", "instruct"]
    for arm in ("constant", "router"):
        assert table["cost"][arm]["shared_with_base"] == ["lm_pretrain", "tower_warmup (+ fusion)"]
        assert table["cost"][arm]["steps"] == {"align": 3, "instruct": 8}
    assert set(table["measures"]["mathverse/Vision Only accuracy"]) == {"clip", "constant", "router"}
    warm = MultimodalLM.from_pretrained(bases / "s0" / "run" / "tower_warmup" / "final")
    start = MultimodalLM.from_pretrained(out / "b0" / "router" / "s0" / "run" / "tower_warmup" / "final")
    assert start.readout is not None and start.meta.fusion["router_merge"] == "residual"
    px = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the graft's image embeddings are the base's, exactly
        assert torch.equal(start.encode_images(px), warm.encode_images(px))
    final = MultimodalLM.from_pretrained(out / "b0" / "router" / "s0" / "run" / "instruct" / "final")
    assert final.router.post_mlp[-1].weight.any()  # the router trained
    assert final.router.mode == "soft" and hasattr(final.router, "gate")
    const = MultimodalLM.from_pretrained(out / "b0" / "constant" / "s0" / "run" / "instruct" / "final")
    assert const.router.mode == "constant"
    for name, p in const.geo.state_dict().items():  # the encoder stays frozen
        assert torch.equal(p, start.geo.state_dict()[name])
    # scripts/router_weights.py reads what each router learned: a grafted start's branch is zero
    from scripts_loader import load_script

    mod = load_script("router_weights")
    images = sorted((bases / "s0" / "world" / "eval" / "images").glob("*.png"))[:4]
    assert mod.router_stats(start, images)["branch_over_tower"] == 0.0
    trained = mod.router_stats(final, images)
    assert trained["branch_over_tower"] > 0 and len(trained["weight_mean"]) == final.router.num_levels
    assert mod.router_stats(const, images)["weight_mean"] == [0.5] * const.router.num_levels


def test_a_tower_arm_trains_the_whole_demo_on_the_claims_tower(tmp_path, bases):
    """tips-qa: each arm is the demo on an extra's pretrained tower (trained once per seed); nothing is
    linked from the base (whose tower differs), and the tower the MLLM starts from is the extra's."""
    from mllm.evidence.runner import run_claim
    from mllm.model import MultimodalLM

    claim = C.TIPS_QA.with_arms(["clip", "tips"])
    out = tmp_path / "tips-qa"
    run_claim(claim, [0], out, bases=bases, quick=True, log=lambda *_: None)
    table = json.loads((out / "b0" / "table.json").read_text())
    for arm, kind in (("clip", "clip"), ("tips", "dinov2_registers")):
        cost = table["cost"][arm]
        assert cost["shared_with_base"] == [] and set(cost["steps"]) == {
            "lm_pretrain",
            "tower_warmup",
            "align",
            "instruct",
        }
        model = MultimodalLM.from_pretrained(out / "b0" / arm / "s0" / "run" / "instruct" / "final")
        assert model.tower.config.type == kind
    assert (bases / "s0" / "extras" / "tips_tower").is_dir()
    assert "tips - clip: qa accuracy" in (out / "b0" / "table.md").read_text()


def test_cloc_qa_trains_grounding_turns_on_each_tower_and_scores_refcoco_through_the_mllm(tmp_path, bases):
    """cloc-qa: the demo on clip-tiny's and cloc-tiny's towers, instruct with one RefCOCO-style turn per
    image and room for it; the held-out referring expressions are answered by the MLLM, one unit each."""
    from mllm.evidence.runner import mllm_recipe, run_claim
    from mllm.model import MultimodalLM

    recipe = mllm_recipe(
        C.CLOC_QA.arm("cloc"), bases / "s0", 0, C.CLOC_QA.budgets[0], True, {"cloc_tower": "T"}
    )
    instruct = next(s for s in recipe.stages if s.name == "instruct")
    assert instruct.data.live.grounding == 1 and recipe.model.max_length == 320
    assert recipe.model.tower.path == "T"
    out = tmp_path / "cloc-qa"
    run_claim(C.CLOC_QA, [0], out, bases=bases, quick=True, log=lambda *_: None)
    table = json.loads((out / "b0" / "table.json").read_text())
    assert table["cost"]["cloc"]["shared_with_base"] == []
    model = MultimodalLM.from_pretrained(out / "b0" / "cloc" / "s0" / "run" / "instruct" / "final")
    assert model.meta.max_length == 320
    evaluated = json.loads((out / "b0" / "cloc" / "s0" / "eval" / "refcoco.json").read_text())
    refs = (bases / "s0" / "world" / "refcoco" / "refcoco_val.jsonl").read_text().splitlines()
    assert len(evaluated["units"]) == len(refs) and "acc@0.5" in evaluated["metrics"]
    hits = sum(u["correct"] for u in evaluated["units"])
    assert hits == round(evaluated["metrics"]["acc@0.5"] * len(refs) / 100)
    assert "cloc - clip: refcoco accuracy" in (out / "b0" / "table.md").read_text()


def test_an_encoder_claim_trains_each_arm_at_the_same_steps(tmp_path, bases):
    from mllm.evidence.runner import run_claim

    out = tmp_path / "cloc"
    summary = run_claim(C.CLOC, [0, 1], out, bases=bases, scale=True, quick=True, log=lambda *_: None)
    first = summary["levels"][0]["verdicts"]
    # --scale goes on to the next budget (here the cap) exactly when a comparison is still open
    assert len(summary["levels"]) == (2 if UNRESOLVED in first.values() else 1)
    assert summary["cap"]["budget"] == len(C.CLOC.budgets) - 1
    table = json.loads((out / "b0" / "table.json").read_text())
    steps = {a: table["cost"][a]["steps"] for a in ("clip", "cloc")}
    assert steps == {"clip": {"contrastive": 4}, "cloc": {"cloc": 4}}
    m = table["measures"]["regions/region_r1 accuracy"]
    assert len(m["clip"]["per_seed"]) == 2 and m["clip"]["items_per_seed"] == m["cloc"]["items_per_seed"]
    assert table["comparisons"][0]["seeds"] == 2


def test_one_seeds_arms_split_over_processes_make_the_same_table_as_one_run(capsys, tmp_path, bases):
    """`--arms A --no-table` trains and evaluates A alone (no comparison needed), where the full run finds it:
    the final run over every arm re-evaluates nothing and writes the table."""
    from mllm.cli import main
    from mllm.evidence.runner import run_claim

    out = tmp_path / "cloc"
    common = ["--seeds", "0", "--out", str(out), "--bases", str(bases), "--quick"]
    assert main(["evidence", "cloc", "--no-table", *common]) == 2  # --no-table names no arms
    assert "needs --arms" in capsys.readouterr().err
    assert main(["evidence", "cloc", "--arms", "cloc", "--no-table", *common]) == 0
    assert "no table written" in capsys.readouterr().out
    assert not (out / "b0" / "table.json").exists() and not (out / "b0" / "clip").exists()
    evals = sorted((out / "b0" / "cloc" / "s0" / "eval").glob("*.json"))
    assert evals and (out / "b0" / "cloc" / "s0" / "cost.json").is_file()
    stamps = [p.stat().st_mtime_ns for p in evals]
    assert main(["evidence", "cloc", "--arms", "coca", "--no-table", *common]) != 0
    assert "has no arm 'coca'" in capsys.readouterr().err
    run_claim(C.CLOC, [0], out, bases=bases, quick=True, log=lambda *_: None)
    assert [p.stat().st_mtime_ns for p in evals] == stamps  # the split-off arm was read, not redone
    table = json.loads((out / "b0" / "table.json").read_text())
    assert set(table["cost"]) == {"clip", "cloc"} and table["comparisons"]


def test_the_cli_lists_the_claims_and_a_blocked_one_exits_2_with_its_reason(capsys, tmp_path, monkeypatch):
    from mllm.cli import main

    assert main(["evidence", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in C.CLAIMS)
    monkeypatch.setitem(C.CLAIMS, "blocked-agla", _blocked())
    assert main(["evidence", "blocked-agla", "--out", str(tmp_path / "blocked"), "--quick"]) == 2
    assert "decoder is not written" in capsys.readouterr().err


def test_scaling_reruns_only_the_unresolved_comparisons_and_their_arms():
    open_ = {C.OBJECTIVES.comparisons[0].key}  # filip - clip on MMVP-VLM
    sub = C.OBJECTIVES.narrowed(open_)
    assert [a.name for a in sub.arms] == ["clip", "filip"]
    assert [c.key for c in sub.comparisons] == list(open_)
    assert sub.budgets == C.OBJECTIVES.budgets and not sub.extra_measures


def test_a_tables_command_names_its_arms_when_they_are_only_some_of_the_claims(tmp_path):
    from mllm.evidence.report import command_line

    some = command_line(
        C.OBJECTIVES.with_arms(["clip", "dcl"]), 2, [0, 1, 2], tmp_path / "b2", tmp_path, False
    )
    assert "--budget 2 --arms clip dcl --out" in some
    assert "--arms" not in command_line(C.OBJECTIVES, 0, [0], tmp_path / "b0", tmp_path, False)


def test_arms_can_be_chosen_and_a_choice_without_a_comparison_is_refused():
    sub = C.OBJECTIVES.with_arms(["clip", "dcl", "negclip"])
    assert {c.arm for c in sub.comparisons} == {"dcl", "negclip"}
    assert all(c.reference == "clip" for c in sub.comparisons)
    with pytest.raises(ValueError, match="no comparison"):
        C.OBJECTIVES.with_arms(["dcl", "negclip"])
    with pytest.raises(KeyError, match="no arm"):
        C.OBJECTIVES.with_arms(["clip", "coca"])


def test_an_arm_override_naming_a_stage_it_lacks_is_an_error_not_dropped(tmp_path):
    from mllm.evidence.runner import mllm_recipe

    typo = C.Arm(
        "bad", "alpha on a stage the demo does not have", overrides=("stages.prior.prior.alpha=0.5",)
    )
    with pytest.raises(Exception, match="prior"):
        mllm_recipe(typo, tmp_path, 0, C.PRIOR.budgets[0], quick=False)
