"""`mllm evidence CLAIM`: build the shared base per seed once, train every arm at equal compute, evaluate,
compare with paired bootstrap intervals, write the table and the figure; escalate the budget while a
comparison is unresolved (`--scale`), up to the claim's last budget (its cap).

Layout under OUT (the claim's folder):
    b<K>/<arm>/s<seed>/run/            the arm's training run (MLLM: the demo's stages it shares are links)
    b<K>/<arm>/s<seed>/eval/<bench>.json   metrics + units, written once; a re-run reads them
    b<K>/<arm>/s<seed>/cost.json       the arm's own training CPU-seconds and wall seconds (an arm an
                                       earlier budget trained from the same recipe links that run: its
                                       cost says `trained_at`)
    b<K>/table.json, table.md, figure.png
    summary.json                       every budget run, its verdicts, and the cap
and under BASES (shared by every claim): s<seed>/ = `mllm demo --seed S --out BASES/s<seed>`, and
s<seed>/variants/<name>/ for a claim whose base is the demo with a change (claims.BaseVariant), and
s<seed>/heldout/<bench>-<N>/ for a budget that asks for a larger MMVP or POPE than the world's.

Finished stages are skipped and an interrupted stage resumes from its checkpoint (train_recipe), an
evaluation written is never redone, so a killed run resumes where it stopped and a re-run is a report.
"""

from __future__ import annotations

import copy
import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from mllm.config import Recipe, find_recipe, load_recipe, recipe_from_dict
from mllm.demo import QUICK, RECIPE, demo_overrides, ensure_world, run_demo
from mllm.evidence.claims import Arm, BaseVariant, Budget, Claim
from mllm.evidence.encoder_evals import ENCODER_EVALS
from mllm.evidence.report import write_report
from mllm.evidence.stats import UNRESOLVED
from mllm.evidence.units import units_for
from mllm.training.checkpoint import atomic_write_text
from mllm.training.continuity import training_changes

#: MLLM benchmarks: where each one's data sits in a world.
MLLM_DATA = {"qa": "", "pope": "pope", "mmvp": "mmvp", "mathverse": "mathverse", "refcoco": "refcoco"}
#: Quick sizes for the stages an arm adds to the demo's recipe (tests, smoke runs).
QUICK_ADDED = (
    "stages.prior_ref.max_steps=3",
    "stages.prior.max_steps=3",
    "stages.prior_ref.batch_size=8",
    "stages.prior.batch_size=8",
)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _present(overrides: list[str], tree: dict[str, Any]) -> list[str]:
    """Overrides of `stages.NAME.*` only where the recipe has a stage NAME: a budget (and the quick
    sizes) name every stage any arm may have (align, or PRIOR's prior), and each arm takes those it has.
    An arm's own overrides are not filtered: one naming a stage the arm lacks is an error."""
    names = {s["name"] for s in tree.get("stages", [])}
    return [o for o in overrides if not o.startswith("stages.") or o.split(".")[1] in names]


def mllm_recipe(
    arm: Arm | None,
    base: Path,
    seed: int,
    budget: Budget,
    quick: bool,
    extras: dict[str, str] | None = None,
    variant: BaseVariant | None = None,
) -> Recipe:
    """The demo's recipe for this base and seed, with the base variant's overrides (a claim's own base),
    the arm's edit, fusion and overrides and the budget's; `extras` are the claim's extra models by name
    (`${name}` in the arm's fusion)."""
    tree = yaml.safe_load(RECIPE.read_text())
    if arm is not None and arm.edit is not None:
        arm.edit(tree)
    if arm is not None and arm.graft is not None:
        tree["model"]["fusion"] = copy.deepcopy(arm.graft)
    # the variant before the quick sizes and the budget: a budget states its steps outright (a claim on
    # a variant that changes a stage's steps gives budgets of its own), and a test's variant stays quick
    shared = demo_overrides(base, seed) + list(variant.overrides if variant else ())
    shared += (list(QUICK) + list(QUICK_ADDED) if quick else []) + list(budget.overrides)
    own = [f"extra.{k}={v}" for k, v in (extras or {}).items()] + list(arm.overrides if arm else ())
    return recipe_from_dict(tree, _present(shared, tree) + own)


def _link(reference_run: Path, run_dir: Path, stage: str) -> None:
    """The reference run's stage folder, linked into this run (train_recipe then skips the stage)."""
    dst = run_dir / stage
    if not dst.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        dst.symlink_to((reference_run / stage).resolve(), target_is_directory=True)


def link_shared(recipe: Recipe, reference: Recipe, reference_run: Path, run_dir: Path) -> list[str]:
    """Link the reference run's finished stages that this recipe would train identically: same model,
    same engine, and the same stage settings up to and including the stage. Returns their names."""
    if recipe.model != reference.model or recipe.engine != reference.engine:
        return []
    shared = []
    for i, stage in enumerate(recipe.stages):
        if i >= len(reference.stages) or recipe.stages[: i + 1] != reference.stages[: i + 1]:
            break
        if not (reference_run / stage.name / "final").is_dir():
            break
        _link(reference_run, run_dir, stage.name)
        shared.append(stage.name)
    return shared


def graft_shared(recipe: Recipe, reference: Recipe, reference_run: Path, run_dir: Path, at: str) -> list[str]:
    """For an arm that fuses a second feature source into the base: link the reference's stages before
    `at`, and write stage `at`'s model as the reference's with the recipe's fusion attached
    (MultimodalLM.with_fusion), so the arm's later stages start from it. The recipe must be the
    reference's up to and including `at` but for `model.fusion`."""
    from mllm.model import MultimodalLM

    names = [s.name for s in recipe.stages]
    if at not in names:
        raise ValueError(f"graft stage {at!r} is not in the recipe ({names})")
    k = names.index(at)
    same = replace(recipe.model, fusion=None) == replace(reference.model, fusion=None)
    if not same or recipe.engine != reference.engine or recipe.stages[: k + 1] != reference.stages[: k + 1]:
        raise ValueError(f"a grafted arm must be the base up to {at!r}, but for its fusion")
    shared = [stage.name for stage in recipe.stages[:k]]
    for name in shared:
        _link(reference_run, run_dir, name)
    final = run_dir / at / "final"
    if not (final / "mllm.json").is_file():
        model = MultimodalLM.from_pretrained(reference_run / at / "final")
        model.with_fusion(recipe.model.fusion).save_pretrained(final)
    return [*shared, f"{at} (+ fusion)"]


def ensure_extras(claim: Claim, base: Path, seed: int, quick: bool, log) -> dict[str, str]:
    """Each of the claim's extra models, trained once per seed on the base's world: the folder of each
    that arms read (its image tower, or its geometric encoder)."""
    from mllm.training.runner import train_recipe

    paths = {}
    for ex in claim.extras:
        overrides = tuple(o.replace("{run}", str(base / "run")) for o in ex.overrides)
        recipe = single_stage_recipe(ex.recipe, base / "world", seed, ex.steps, quick, overrides)
        out = base / "extras" / ex.name
        part = out / recipe.stages[-1].name / "final" / ex.output
        if not part.is_dir():  # trained once: later arms and seeds read it
            train_recipe(recipe, out, log=log)
        if not part.is_dir():
            raise FileNotFoundError(f"extra {ex.name!r} ({ex.recipe}) finished without {part}")
        paths[ex.name] = str(part)
    return paths


def _train(recipe: Recipe, run_dir: Path, arm_dir: Path, shared: list[str], log) -> dict[str, Any]:
    from mllm.evaluation.periodic import make_evaluator
    from mllm.training.runner import train_recipe

    cost_path = arm_dir / "cost.json"
    if cost_path.is_file():  # done: but only if done with what is asked now (claims.py may have changed)
        saved = run_dir / "recipe.yaml"
        changed = training_changes(load_recipe(saved), recipe) if saved.is_file() else []
        if changed:
            raise ValueError(
                f"{arm_dir} was trained under other settings than it is asked now: {'; '.join(changed[:6])}"
                f"{'; ...' if len(changed) > 6 else ''}; remove that folder to train it again, or give the "
                "changed arm or base variant a new name"
            )
        return json.loads(cost_path.read_text())
    evaluator = make_evaluator(recipe) if any(s.eval_every for s in recipe.stages) else None
    cpu0, t0 = _cpu_s(), time.time()
    summary = train_recipe(recipe, run_dir, log=log, evaluator=evaluator)
    trained = {k: v for k, v in summary.get("stages", {}).items() if k not in shared}
    cost = {
        "cpu_s": round(_cpu_s() - cpu0, 1),
        "wall_s": round(time.time() - t0, 1),
        "stages": {k: {"steps": v["steps"], "wall_s": v["wall_s"]} for k, v in trained.items()},
        "shared_with_base": shared,
        "final": summary.get("final") or str(run_dir / recipe.stages[-1].name / "final"),
    }
    atomic_write_text(cost_path, json.dumps(cost, indent=1))
    return cost


Evaluation = dict[str, Any]  # {"metrics": ..., "units": [...]}, one benchmark of one arm and seed


def _evaluated(arm_dir: Path, bench: str, compute, log, data: Path | None = None) -> Evaluation:
    """The arm's evaluation on `bench`: read if written before, else `compute()` -> (metrics, units),
    written once (atomically) so a re-run never redoes it. `data` (the held-out set answered, relative to
    the seed's base folder) is recorded, and an evaluation recorded on another set is refused, not mixed
    into a table of this one."""
    path = arm_dir / "eval" / f"{bench}.json"
    if path.is_file():
        done = json.loads(path.read_text())
        if data is not None and done.get("data", str(data)) != str(data):
            raise ValueError(
                f"{path} answered {done['data']}, but this budget asks {data}; remove that file to evaluate again"
            )
        return done
    metrics, units = compute()
    out = {"metrics": metrics, "units": units, **({"data": str(data)} if data is not None else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out))
    log(f"{arm_dir}: {bench} done")
    return out


def reuse_earlier(recipe: Recipe, arm_dir: Path, earlier: tuple[Path, ...], log) -> bool:
    """Where an earlier budget trained this arm from the same recipe (a budget that adds only held-out
    items), link its run and take its cost, so the arm is not trained twice; the cost names where it was
    trained. True when the arm is (now) reused or already finished here."""
    if (arm_dir / "cost.json").is_file():
        return True
    for before in earlier:
        saved = before / "run" / "recipe.yaml"
        if not (before / "cost.json").is_file() or not saved.is_file():
            continue
        if training_changes(load_recipe(saved), recipe):
            continue
        arm_dir.mkdir(parents=True, exist_ok=True)
        run = arm_dir / "run"
        if run.is_symlink() or not run.exists():  # a half-made link from a killed run is made again
            run.unlink(missing_ok=True)
            run.symlink_to(before.joinpath("run").resolve(), target_is_directory=True)
        cost = json.loads((before / "cost.json").read_text())
        cost["trained_at"] = str(before)
        atomic_write_text(arm_dir / "cost.json", json.dumps(cost, indent=1))
        log(f"{arm_dir}: the arm as trained at {before} (same recipe)")
        return True
    return False


#: a world's own size of each set a budget can enlarge (its manifest's params)
HELD_OUT_PARAM = {"mmvp": "mmvp_pairs", "pope": "pope_questions"}


def held_out(base: Path, bench: str, budget: Budget, quick: bool) -> Path:
    """Where an MLLM benchmark's items sit: the world's own set, or, for a budget that asks for a larger
    one, that set written once beside the world (BASES/s<seed>/heldout/<bench>-<N>/<bench>), whose first
    items are the world's own (write_held_out_at). Quick runs use twice the world's own size."""
    world = base / "world"
    n = dict(budget.held_out).get(bench)
    if not n:
        return world / MLLM_DATA[bench]
    from mllm.data.geoworld import write_held_out_at

    if quick:
        n = 2 * json.loads((world / "manifest.json").read_text())["params"][HELD_OUT_PARAM[bench]]
    dst = base / "heldout" / f"{bench}-{n}"
    if not (dst / bench / "scenes.jsonl").is_file():  # its last file: a set cut short is written again
        partial = dst.with_name(dst.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_held_out_at(world, partial, bench, n)
        shutil.rmtree(dst, ignore_errors=True)
        partial.rename(dst)
    return dst / bench


@dataclass(frozen=True)
class ArmJob:
    """One arm of a claim at one budget and seed: where its base and its folder are, and the folders of
    the same arm at the earlier budgets (one of which may already have trained it: reuse_earlier)."""

    claim: Claim
    arm: Arm
    seed: int
    budget: Budget
    base: Path
    arm_dir: Path
    quick: bool
    log: Callable[..., Any]
    earlier: tuple[Path, ...] = ()


Outcome = tuple[dict[str, Any], dict[str, Evaluation]]  # (cost, {bench: evaluation})


def run_mllm_arm(job: ArmJob) -> Outcome:
    from mllm.evaluation.agla import AglaConfig
    from mllm.evaluation.runner import evaluate
    from mllm.model import MultimodalLM

    claim, arm, base = job.claim, job.arm, job.base
    extras = ensure_extras(claim, base, job.seed, job.quick, job.log)
    recipe = mllm_recipe(arm, base, job.seed, job.budget, job.quick, extras, claim.base)
    run_dir = job.arm_dir / "run"
    shared: list[str] = []
    if not reuse_earlier(recipe, job.arm_dir, job.earlier, job.log):
        reference = mllm_recipe(None, base, job.seed, Budget(""), job.quick, variant=claim.base)
        reference_run = variant_run(base, claim.base)
        if arm.graft is not None:
            shared = graft_shared(recipe, reference, reference_run, run_dir, arm.graft_at)
        else:
            shared = link_shared(recipe, reference, reference_run, run_dir)
    cost = _train(recipe, run_dir, job.arm_dir, shared, job.log)
    agla = AglaConfig() if arm.decoding == "agla" else None
    model: list[MultimodalLM] = []  # loaded at the first benchmark not yet evaluated
    sets = {b: held_out(base, b, job.budget, job.quick) for b in claim.benches}

    def answer(bench: str):
        if not model:
            model.append(MultimodalLM.from_pretrained(cost["final"]))
        data = sets[bench]
        metrics, records = evaluate(model[0], bench, data, batch_size=32, decoding=arm.decoding, agla=agla)
        return metrics, units_for(bench, records, data)

    return cost, {
        b: _evaluated(job.arm_dir, b, lambda b=b: answer(b), job.log, sets[b].relative_to(base))
        for b in claim.benches
    }


def single_stage_recipe(
    name: str, world: Path, seed: int, steps: int | None, quick: bool, overrides: tuple[str, ...] = ()
) -> Recipe:
    """A packaged one-stage recipe (an encoder arm, a claim's extra) on `world` for `steps` steps (None:
    the recipe's own); quick: 4 steps at batch 8."""
    path = find_recipe(name)
    stage = yaml.safe_load(path.read_text())["stages"][0]["name"]
    steps = 4 if quick else steps
    out = [f"extra.world={world}", f"engine.seed={seed}", *overrides]
    if steps is not None:
        out.append(f"stages.{stage}.max_steps={steps}")
    if quick:
        out += [f"stages.{stage}.batch_size=8", "engine.checkpoint_every=4"]
    return load_recipe(path, out)


def encoder_recipe(arm: Arm, world: Path, seed: int, budget: Budget, quick: bool) -> Recipe:
    return single_stage_recipe(
        arm.recipe, world, seed, budget.steps, quick, (*arm.overrides, *budget.overrides)
    )


def run_encoder_arm(job: ArmJob) -> Outcome:
    world = job.base / "world"
    recipe = encoder_recipe(job.arm, world, job.seed, job.budget, job.quick)
    reuse_earlier(recipe, job.arm_dir, job.earlier, job.log)
    cost = _train(recipe, job.arm_dir / "run", job.arm_dir, [], job.log)

    def answer(bench: str):
        metrics, rows = ENCODER_EVALS[bench](Path(cost["final"]), recipe.model.tower.type, world)
        return metrics, units_for(bench, rows, world)

    return cost, {b: _evaluated(job.arm_dir, b, lambda b=b: answer(b), job.log) for b in job.claim.benches}


#: how an arm of each claim level is trained and evaluated
ARM_RUNNERS: dict[str, Callable[[ArmJob], Outcome]] = {"mllm": run_mllm_arm, "encoder": run_encoder_arm}


def variant_run(base: Path, variant: BaseVariant | None) -> Path:
    """The run the arms start from: the demo's (`base/run`), or the claim's base variant's."""
    return base / "run" if variant is None else base / "variants" / variant.name / "run"


def ensure_variant(variant: BaseVariant, base: Path, seed: int, quick: bool, log) -> dict[str, Any]:
    """The base variant of this seed, built once beside the demo's run: the demo's stages it would train
    alike are linked, the rest trained (their CPU-seconds in its `cost.json`); the world, the encoder and
    the extras stay the demo's."""
    recipe = mllm_recipe(None, base, seed, Budget(""), quick, variant=variant)
    demo = mllm_recipe(None, base, seed, Budget(""), quick)
    run_dir = variant_run(base, variant)
    if not (run_dir.parent / "cost.json").is_file():
        log(f"building the base variant {variant.name!r} of seed {seed}: {', '.join(variant.overrides)}")
    shared = link_shared(recipe, demo, base / "run", run_dir)
    return _train(recipe, run_dir, run_dir.parent, shared, log)


def ensure_base(claim: Claim, base: Path, seed: int, quick: bool, log) -> None:
    """The demo run of this seed and the claim's base variant (MLLM claims), or only the world (encoder
    claims)."""
    if claim.level == "mllm":
        if not (base / "results.json").is_file():
            log(f"[{claim.name}] building the base: mllm demo --seed {seed} --out {base}")
            run_demo(base, seed=seed, quick=quick, log=log)
        if claim.base is not None:
            ensure_variant(claim.base, base, seed, quick, log)
    else:
        ensure_world(base / "world", seed, quick=quick, log=log)


def _run_arms(
    claim: Claim, arms: list[Arm], level: int, seeds: list[int], out: Path, bases: Path, quick: bool, log
) -> dict[str, dict[int, Outcome]]:
    """Each arm trained and evaluated per seed at budget `level` (finished ones read back):
    {arm: {seed: (cost, {bench: evaluation})}}."""
    arm_run = ARM_RUNNERS[claim.level]
    done: dict[str, dict[int, Outcome]] = {}
    for seed in seeds:
        base = bases / f"s{seed}"
        ensure_base(claim, base, seed, quick, log)
        for arm in arms:
            arm_dir = out / f"b{level}" / arm.name / f"s{seed}"
            earlier = tuple(out / f"b{j}" / arm.name / f"s{seed}" for j in range(level))
            job = ArmJob(claim, arm, seed, claim.budgets[level], base, arm_dir, quick, log, earlier)
            done.setdefault(arm.name, {})[seed] = arm_run(job)
    return done


def run_budget(
    claim: Claim, level: int, seeds: list[int], out: Path, bases: Path, quick: bool, log
) -> dict[str, Any]:
    done = _run_arms(claim, list(claim.arms), level, seeds, out, bases, quick, log)
    costs = {a: {s: cost for s, (cost, _) in by.items()} for a, by in done.items()}
    units = {
        a: {s: {b: e["units"] for b, e in ev.items()} for s, (_, ev) in by.items()} for a, by in done.items()
    }
    metrics = {
        a: {s: {b: e["metrics"] for b, e in ev.items()} for s, (_, ev) in by.items()}
        for a, by in done.items()
    }
    return write_report(claim, level, seeds, units, costs, metrics, out / f"b{level}", bases, quick)


def _checked(
    claim: Claim, seeds: list[int], budget: int, out: str | Path, bases: str | Path | None
) -> tuple[Path, Path]:
    """Refuse what cannot run (a blocked claim, no seed, a budget the claim lacks) before anything trains;
    the output folder and the bases folder (default: beside the output, shared by the claims)."""
    if claim.blocked:
        raise BlockedClaim(f"claim {claim.name!r} cannot run on the seeing base yet: {claim.blocked}")
    if len(seeds) < 1:
        raise ValueError("give at least one seed (the statistics want three or more)")
    if not 0 <= budget < len(claim.budgets):
        raise ValueError(f"claim {claim.name!r} has budgets 0..{len(claim.budgets) - 1}, got {budget}")
    out = Path(out)
    return out, Path(bases) if bases is not None else out.parent / "bases"


def run_claim(
    claim: Claim,
    seeds: list[int],
    out: str | Path,
    bases: str | Path | None = None,
    budget: int = 0,
    scale: bool = False,
    quick: bool = False,
    log=print,
) -> dict[str, Any]:
    """Run `claim` at budget level `budget` (and, with `scale`, each next level while any directed
    comparison's interval spans zero, up to the claim's last level: the cap; a larger budget reruns only
    the comparisons still unresolved, and the arms they compare). Returns the summary."""
    out, bases = _checked(claim, seeds, budget, out, bases)
    levels: list[dict[str, Any]] = []
    level = budget
    running = claim
    while True:
        table = run_budget(running, level, seeds, out, bases, quick, log)
        open_ = [c["comparison"] for c in table["comparisons"] if c["verdict"] == UNRESOLVED]
        levels.append(
            {
                "budget": level,
                "describe": claim.budgets[level].describe,
                "verdicts": {c["comparison"]: c["verdict"] for c in table["comparisons"]},
                "table": str(out / f"b{level}" / "table.md"),
                "figure": str(out / f"b{level}" / "figure.png"),
            }
        )
        if not scale or not open_ or level + 1 >= len(claim.budgets):
            break
        log(f"[{claim.name}] {len(open_)} comparison(s) unresolved at budget {level}: scaling to {level + 1}")
        running = running.narrowed(set(open_))  # the next budget reruns only what is still open
        level += 1
    path = out / "summary.json"
    if path.is_file():  # budgets run before (e.g. by an earlier --budget) stay listed
        ran = {lv["budget"] for lv in levels}
        earlier = [lv for lv in json.loads(path.read_text()).get("levels", []) if lv["budget"] not in ran]
        levels = sorted(earlier + levels, key=lambda lv: lv["budget"])
    summary = {
        "claim": claim.name,
        "seeds": seeds,
        "levels": levels,
        "cap": {"budget": len(claim.budgets) - 1, "describe": claim.budgets[-1].describe},
        "quick": quick,
    }
    atomic_write_text(path, json.dumps(summary, indent=1))
    return summary


def run_arms(
    claim: Claim,
    names: list[str],
    seeds: list[int],
    out: str | Path,
    bases: str | Path | None = None,
    budget: int = 0,
    quick: bool = False,
    log=print,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Train and evaluate only the arms `names` at budget level `budget`, writing their runs and
    evaluations where `run_claim` would find them, and no table: one seed's arms can then be split over
    several processes (no two on the same arm), and a final `run_claim` over every arm reads them all and
    writes the table. Returns {arm: {seed: cost}}."""
    out, bases = _checked(claim, seeds, budget, out, bases)
    arms = [claim.arm(n) for n in names]  # unknown names fail here, before any training
    done = _run_arms(claim, arms, budget, seeds, out, bases, quick, log)
    return {a: {s: cost for s, (cost, _) in by.items()} for a, by in done.items()}


class BlockedClaim(RuntimeError):
    """A claim whose arms cannot be built on the seeing base yet (the reason is its `blocked`)."""
