"""The seed papers' claims as experiments: arms, what is measured, the direction each paper claims, and
the budgets a claim escalates through when its interval spans zero (`mllm evidence CLAIM`).

Two levels of experiment share one shape:
- `mllm` claims train (or only decode with) the demo's MLLM. Every arm is the demo's recipe
  (mllm/recipes/tiny-geoworld.yaml) with an edit; the stages an arm does not change (same model, same
  engine, same stage settings up to and including that stage) are the base's finished stages, linked,
  not retrained, so arms differ by exactly what the claim names. The base is `mllm demo --seed S`.
- `encoder` claims pretrain image-text (or image-only) encoders on the base's world at equal steps,
  batch and data order, and score them without an LLM.

A claim that cannot run on the seeing base yet says why in `blocked`; the command then stops with that
reason instead of measuring something else under the claim's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Measure:
    """One number per arm and seed: `metric` (stats.REDUCERS) of benchmark `bench`'s units, restricted to
    one `group` (a POPE split, an MMVP pattern, a QA category) or over all of them."""

    bench: str
    metric: str
    group: str | None = None

    @property
    def name(self) -> str:
        return f"{self.bench}{'/' + self.group if self.group else ''} {self.metric}"


@dataclass(frozen=True)
class Arm:
    """One arm. MLLM arms: `overrides` (key=value on the demo recipe), `edit` (a change to the recipe
    tree that overrides cannot say, e.g. replacing a stage) and `decoding` (how evaluation answers).
    Encoder arms: the packaged `recipe` trained, with `overrides`."""

    name: str
    describe: str
    overrides: tuple[str, ...] = ()
    edit: Callable[[dict[str, Any]], None] | None = None
    decoding: str = "greedy"
    recipe: str | None = None
    # MLLM arms that fuse a second feature source into the base (`model.fusion`, a dict whose strings may
    # name a claim's extras as "${name}"): the base's model after stage `graft_at`, with the fusion
    # attached (MultimodalLM.with_fusion), is where the arm's later stages start
    graft: dict[str, Any] | None = None
    graft_at: str = "tower_warmup"


@dataclass(frozen=True)
class Extra:
    """A model a claim needs beside the base, trained once per seed on the base's world (MoF's
    self-supervised tower, SVE-Math's geometric encoder): packaged `recipe`, `steps` of its single stage;
    arms name its `output` (a folder of the stage's final checkpoint: an image tower, or `geo`) as
    "${name}". `overrides` are applied to the recipe, "{run}" standing for the base's run folder (an
    extra built around the base's own model)."""

    name: str
    recipe: str
    steps: int
    output: str = "image_tower"
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """`arm` against `reference` on `measure`; `expect` +1 where the paper says the arm is higher,
    -1 lower, 0 where it claims no direction (reported with its interval, no verdict)."""

    arm: str
    reference: str
    measure: Measure
    expect: int = 1

    @property
    def key(self) -> str:
        return f"{self.arm} - {self.reference}: {self.measure.name}"


@dataclass(frozen=True)
class Budget:
    """A budget level: overrides applied to every arm alike (more steps), and what it is, in words."""

    describe: str
    overrides: tuple[str, ...] = ()
    steps: int | None = None  # encoder claims: every arm's (single) training stage runs this many steps
    # MLLM claims: larger held-out sets, (bench, size) with size as write_world counts it (MMVP pairs, POPE
    # questions per split); the world's own set is each one's first part (runner.held_out). A budget that
    # changes nothing else reuses the arms an earlier budget trained
    held_out: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class BaseVariant:
    """The base a claim's arms start from when it is not the demo itself: the demo's recipe with
    `overrides`, built once per seed from the demo's own finished stages (those it would train alike are
    linked, the rest trained) and shared by every claim that names it. Why: a method that fixes a fault
    needs a base with the fault; the demo is built not to have it (hallucination: docs/evidence.md)."""

    name: str
    describe: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Claim:
    name: str
    title: str
    paper: str
    level: str  # "mllm" | "encoder"
    arms: tuple[Arm, ...]
    comparisons: tuple[Comparison, ...]
    benches: tuple[str, ...]
    budgets: tuple[Budget, ...]
    extra_measures: tuple[Measure, ...] = ()  # reported per arm, not compared
    extras: tuple[Extra, ...] = ()
    base: BaseVariant | None = None  # None: the demo model is the base
    blocked: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"claim {self.name!r} has no arm {name!r}; arms: {[a.name for a in self.arms]}")

    def with_arms(self, names: list[str]) -> Claim:
        """This claim restricted to the arms `names` (each must exist; at least two) and the comparisons
        between them: a larger budget spent where it is needed."""
        for n in names:
            self.arm(n)
        comps = tuple(c for c in self.comparisons if c.arm in names and c.reference in names)
        if len(set(names)) < 2 or not comps:
            raise ValueError(f"arms {names} leave claim {self.name!r} no comparison")
        return replace(self, arms=tuple(a for a in self.arms if a.name in names), comparisons=comps)

    def narrowed(self, keys: set[str]) -> Claim:
        """This claim with only the comparisons named by `keys` and the arms they compare: what a larger
        budget reruns when only those were unresolved (the rest already have their verdict)."""
        comps = tuple(c for c in self.comparisons if c.key in keys)
        names = {n for c in comps for n in (c.arm, c.reference)}
        arms = tuple(a for a in self.arms if a.name in names)
        return replace(self, arms=arms, comparisons=comps, extra_measures=())

    @property
    def measures(self) -> tuple[Measure, ...]:
        seen: dict[str, Measure] = {}
        for m in [c.measure for c in self.comparisons] + list(self.extra_measures):
            seen.setdefault(m.name, m)
        return tuple(seen.values())


POPE_SPLITS = ("random", "popular", "adversarial")


def _pope_measures(metric: str) -> list[Measure]:
    return [Measure("pope", metric, s) for s in POPE_SPLITS]


def _prior_stages(tree: dict[str, Any]) -> None:
    """The demo's `align` (projector on captions, plain loss) replaced by PRIOR's pair: a text-only
    reference LM on the captions (`prior_ref`), then the same projector alignment with each caption token
    weighed by how unpredictable the reference found it (`prior`; alpha 0 is exactly the plain loss).
    The reference starts from the pretrained LM and `prior` from the warm-up, so the MLLM's LM is the
    base LM, not the caption-tuned reference."""
    stages = tree["stages"]
    i = next(k for k, s in enumerate(stages) if s["name"] == "align")
    align = stages[i]
    ref = {
        "name": "prior_ref",
        "kind": "prior_ref",
        "data": dict(align["data"]),
        "lr": 5.0e-4,
        "batch_size": 32,
        "max_steps": 60,
        "warmup_ratio": 0.1,
    }
    # the demo's align trains the projector and the readout; `prior`'s own default is the projector only
    prior = dict(
        align,
        name="prior",
        kind="prior",
        init="tower_warmup",
        trainable={"projector": align["lr"], "readout": align["lr"]},
    )
    prior["prior"] = {"alpha": 1.0, "floor": 0.0, "cap": 1.0e9, "ref": "stage:prior_ref"}
    stages[i : i + 1] = [ref, prior]


MLLM_BUDGETS = (
    Budget("the demo's budget: align 30 steps, instruct 420"),
    Budget(
        "instruct doubled (840 steps), align doubled (60)",
        ("stages.instruct.max_steps=840", "stages.align.max_steps=60", "stages.prior.max_steps=60"),
    ),
)


#: MLLM claims whose cap left an MMVP-style comparison open within a few pairs: the cap's arms (reused, not
#: retrained) asked eight times the world's 64 pairs
MLLM_BUDGETS_MMVP = (
    *MLLM_BUDGETS,
    Budget(
        "budget 1's arms (reused, not retrained); MMVP-style pairs 512 per seed (the world's 64 their first)",
        MLLM_BUDGETS[1].overrides,
        held_out=(("mmvp", 512),),
    ),
)


def _encoder_budgets(*steps: int) -> tuple[Budget, ...]:
    return tuple(Budget(f"{n} training steps per arm, batch 64", steps=n) for n in steps)


AGLA = Claim(
    name="agla",
    title="AGLA: assembling global and local attention reduces hallucination",
    paper="AGLA (An et al. 2024): POPE accuracy and F1 up over regular decoding on LLaVA-1.5 and others.",
    level="mllm",
    arms=(
        Arm("greedy", "the demo model, greedy decoding"),
        Arm("agla", "the same model, AGLA decoding (alpha 2, beta 0.5, keep 0.5)", decoding="agla"),
    ),
    comparisons=tuple(
        [Comparison("agla", "greedy", m) for m in _pope_measures("accuracy") + _pope_measures("f1")]
        + [
            Comparison("agla", "greedy", Measure("qa", "accuracy")),
            Comparison("agla", "greedy", Measure("mmvp", "accuracy")),
        ]
        + [Comparison("agla", "greedy", m, expect=0) for m in _pope_measures("yes_ratio")]
    ),
    benches=("pope", "qa", "mmvp"),
    budgets=(Budget("decoding only: the demo model as trained"),),
    notes=(
        "No training: both arms are the base model; only the decoder differs, so the budget is fixed.",
        "AGLA also reports gains on general perception benchmarks; QA and MMVP-style pairs are measured "
        "because they are not at ceiling on the seeing base, where POPE may be.",
    ),
)


def _prior_arm(name: str, alpha: float) -> Arm:
    """PRIOR's pair in place of `align`, its token weights (1 - p_ref)^alpha: alpha 0 is exactly the plain
    next-token loss, 1 the paper's default; larger alphas push the loss further towards the tokens the
    text-only reference could not predict."""
    return Arm(
        name,
        f"align as prior_ref + prior with alpha {alpha:g}"
        + (" (exactly the plain next-token loss)" if alpha == 0 else ""),
        overrides=() if alpha == 1 else (f"stages.prior.prior.alpha={alpha!r}",),
        edit=_prior_stages,
    )


def _prior_comparisons(arm: str) -> list[Comparison]:
    """`arm` against plain next-token prediction: POPE up (the paper's claim), QA up, yes-ratio no
    direction."""
    return (
        [Comparison(arm, "ntp", m) for m in _pope_measures("accuracy") + _pope_measures("f1")]
        + [Comparison(arm, "ntp", Measure("qa", "accuracy"))]
        + [Comparison(arm, "ntp", m, expect=0) for m in _pope_measures("yes_ratio")]
    )


PRIOR = Claim(
    name="prior",
    title="PRIOR: re-weighting alignment towards image-related tokens cuts hallucination",
    paper="PRIOR (2025): about +19% average relative gain on hallucination benchmarks over plain NTP.",
    level="mllm",
    arms=(_prior_arm("ntp", 0.0), _prior_arm("prior", 1.0)),
    comparisons=tuple(_prior_comparisons("prior")),
    benches=("pope", "qa"),
    budgets=MLLM_BUDGETS,
)

#: A base that sees yet hallucinates, as LLaVA-1.5 does on POPE (fine on random objects, "yes" to absent
#: objects that co-occur with present ones): the demo's instruct at half its steps (210, the curriculum
#: scaled with it) on LLaVA-Instruct's existence mix, 9 in 10 existence questions answered yes and negatives
#: never near misses by design (the POPE paper traces LVLMs' "yes" bias to such data). Either change alone
#: fell short on seed 0 (docs/evidence.md): the mix on the full demo still said yes to under 1% of absent
#: objects, and dropping the readout instead left a model that answered every POPE question "yes".
WEAK_YES = BaseVariant(
    "weak-yes",
    "the demo with instruct at half its steps (210) on a yes-heavy existence mix: 9 in 10 existence questions "
    "answered yes, negatives never near misses by design, four probes an image",
    overrides=(
        "stages.instruct.max_steps=210",
        "stages.instruct.data.live.curriculum=3200",
        "stages.instruct.eval_every=210",
        "stages.instruct.data.live.existence_yes=0.9",
        "stages.instruct.data.live.existence_near=0.0",
        "stages.instruct.data.live.existence=4",
    ),
)

AGLA_WEAK = replace(
    AGLA,
    name="agla-weak",
    title="AGLA on a base that hallucinates: does assembling global and local attention cut false yeses?",
    arms=(
        Arm("greedy", "the weak-yes base model, greedy decoding"),
        Arm("agla", "the same model, AGLA decoding (alpha 2, beta 0.5, keep 0.5)", decoding="agla"),
    ),
    base=WEAK_YES,
    budgets=(
        Budget("decoding only: the weak-yes base as trained"),
        Budget(
            "decoding only; POPE at its official size, 3,000 questions per split (the world's 300 its first)",
            held_out=(("pope", 3000),),
        ),
    ),
    notes=(
        "Both arms are the weak-yes base model (the demo's stages up to align, linked; instruct retrained at "
        "210 steps on a yes-heavy existence mix); only the decoder differs, so no budget trains more.",
        "The question the demo's base cannot answer (it says yes to under 1% of absent objects): whether "
        "AGLA helps a model that sees yet hallucinates. The second budget asks ten times as many POPE "
        "questions, since the first left a point's difference inside its interval.",
    ),
)

#: PRIOR's alpha swept where there is hallucination to cut (on the demo base POPE is at its ceiling): 0.5
#: and 2 beside the paper's 1, each against plain next-token prediction
_PRIOR_SWEEP = (("prior05", 0.5), ("prior", 1.0), ("prior2", 2.0))

PRIOR_WEAK = replace(
    PRIOR,
    name="prior-weak",
    title="PRIOR on a base that hallucinates: does re-weighting alignment cut false yeses?",
    base=WEAK_YES,
    arms=(_prior_arm("ntp", 0.0), *(_prior_arm(n, a) for n, a in _PRIOR_SWEEP)),
    comparisons=tuple(c for n, _ in _PRIOR_SWEEP for c in _prior_comparisons(n)),
    budgets=(
        Budget("the weak-yes base's budget: alignment 30 steps, instruct 210"),
        Budget("alignment doubled (60 steps), instruct as the base's (210)", ("stages.prior.max_steps=60",)),
        Budget(
            "budget 1's arms (reused, not retrained); POPE at its official size, 3,000 questions per split",
            ("stages.prior.max_steps=60",),
            held_out=(("pope", 3000),),
        ),
    ),
    notes=(
        "Every arm is the weak-yes base's recipe with align replaced by PRIOR's pair (alpha 0, 0.5, 1 or 2), then its "
        "instruct (210 steps, the yes-heavy mix); the LM's pretraining and the warm-up are the demo's, linked.",
        "The larger budget doubles the stage PRIOR changes; instruct stays the base's, whose shortness is "
        "what leaves the base hallucinating. The cap asks the same arms ten times as many POPE questions.",
    ),
)

_OBJECTIVES = ("clip", "siglip", "filip", "dcl", "negclip")

OBJECTIVES = Claim(
    name="objectives",
    title="Contrastive objectives: FILIP / DCL / NegCLIP / SigLIP against CLIP",
    paper=(
        "FILIP: token-wise interaction helps fine-grained matching; DCL: removing the positive from the "
        "denominator trains better at small batch; NegCLIP: hard negatives fix attribute/relation swaps "
        "(ARO); SigLIP: the pairwise sigmoid matches or beats softmax CLIP."
    ),
    level="encoder",
    arms=tuple(
        Arm(
            o,
            f"clip-resnet-tiny (the demo's encoder) with objective {o}",
            recipe="clip-resnet-tiny",
            overrides=(f"model.encoder.objective={o}",),
        )
        for o in _OBJECTIVES
    ),
    comparisons=(
        Comparison("filip", "clip", Measure("mmvp_vlm", "accuracy")),
        Comparison("filip", "clip", Measure("retrieval", "R@1")),
        Comparison("dcl", "clip", Measure("retrieval", "R@1")),
        Comparison("negclip", "clip", Measure("swaps", "accuracy", "attribute")),
        Comparison("negclip", "clip", Measure("swaps", "accuracy", "relation")),
        Comparison("negclip", "clip", Measure("swaps", "accuracy", "order")),
        Comparison("siglip", "clip", Measure("retrieval", "R@1")),
    ),
    extra_measures=(Measure("retrieval", "R@5"), Measure("swaps", "accuracy")),
    benches=("retrieval", "mmvp_vlm", "swaps"),
    budgets=_encoder_budgets(120, 300, 600),
    notes=(
        "Swaps: GeoWorld's hard-negative writer applied to the held-out scenes (an attribute swapped, two "
        "objects' places swapped, the attribute order shuffled); the image must score its caption higher.",
        "NegCLIP and FILIP cost more per step (see CPU-s): equal steps, batch and data, not equal FLOPs.",
    ),
)

TIPS = Claim(
    name="tips",
    title="TIPS: spatially-aware image-text pretraining gives better dense features",
    paper="TIPS (Maninis et al. 2025): better dense prediction than CLIP-style models at equal data.",
    level="encoder",
    arms=(
        Arm("clip", "clip-tiny (ViT, caption contrast)", recipe="clip-tiny"),
        Arm(
            "tips",
            "tips-tiny (noisy + exact captions, masked modelling, self-distillation)",
            recipe="tips-tiny",
        ),
        Arm("dino", "dino-tiny (self-supervised, no text)", recipe="dino-tiny"),
    ),
    comparisons=(
        Comparison("tips", "clip", Measure("dense_probe", "accuracy", "colour")),
        Comparison("tips", "clip", Measure("dense_probe", "accuracy", "shape")),
        Comparison("dino", "clip", Measure("dense_probe", "accuracy", "shape")),
    ),
    benches=("dense_probe",),
    budgets=_encoder_budgets(120, 300),
    notes=(
        "Dense probe: a linear probe per label on frozen patch tokens, foreground patches of the held-out scenes.",
    ),
)


def _tower_arm(name: str, extra: str, tower_type: str, describe: str) -> Arm:
    """The demo with its tower replaced by a claim's extra (a packaged encoder's image tower): every
    stage, the tower warm-up included, trains on that tower."""
    return Arm(name, describe, overrides=(f"model.tower.type={tower_type}", f"model.tower.path=${{{extra}}}"))


TIPS_QA = Claim(
    name="tips-qa",
    title="TIPS: the seeing MLLM's QA with each tower",
    paper="TIPS (Maninis et al. 2025): spatially-aware image-text features serve dense and "
    "fine-grained tasks better than CLIP's.",
    level="mllm",
    arms=(
        _tower_arm("clip", "clip_tower", "clip", "the demo on clip-tiny's tower (ViT, caption contrast)"),
        _tower_arm("tips", "tips_tower", "dinov2_registers", "the demo on tips-tiny's tower"),
        _tower_arm("dino", "dino_tower", "dinov2", "the demo on dino-tiny's tower (no text)"),
    ),
    comparisons=(
        Comparison("tips", "clip", Measure("qa", "accuracy")),
        Comparison("dino", "clip", Measure("qa", "accuracy")),
        Comparison("tips", "clip", Measure("mmvp", "accuracy")),
    ),
    benches=("qa", "mmvp"),
    budgets=MLLM_BUDGETS_MMVP,
    extras=(
        Extra("clip_tower", "clip-tiny", 120),
        Extra("tips_tower", "tips-tiny", 120),
        Extra("dino_tower", "dino-tiny", 120),
    ),
    notes=(
        "Each tower is pretrained 120 steps at batch 64 on the seed's world (the tips claim's first "
        "budget), then the whole demo trains on it: the LM's text pretraining, the tower's per-patch "
        "warm-up (which fine-tunes the tower), align and instruct. The base (the demo's ResNet tower) is "
        "not an arm: the three arms share the ViT size and differ by the tower's pretraining alone.",
    ),
)

CLOC = Claim(
    name="cloc",
    title="CLOC: region-text contrast improves localisation",
    paper="CLOC (Chen et al. 2024): region retrieval and grounding up over CLIP (Ferret 50.7 -> 56.9).",
    level="encoder",
    arms=(
        Arm("clip", "clip-tiny (image-level contrast)", recipe="clip-tiny"),
        Arm(
            "cloc",
            "cloc-tiny (the same, plus region-text contrast and the promptable prompter)",
            recipe="cloc-tiny",
        ),
    ),
    comparisons=(Comparison("cloc", "clip", Measure("regions", "accuracy", "region_r1")),),
    benches=("regions",),
    budgets=_encoder_budgets(120, 300),
    notes=(
        "Grounding through the MLLM (acc@0.5) is the cloc-qa claim; here the encoder-level region R@1 "
        "(region -> phrase over every distinct phrase) is measured, CLIP from crops.",
    ),
)

#: What the grounding arms add to the demo: one RefCOCO-style turn per training image in instruct, and
#: room for it (LLaVA-1.5's prompt and box answer are ~70 tokens; at 256 a turn would often be cut)
_GROUNDING = ("stages.instruct.data.live.grounding=1", "model.max_length=320")


def _grounding_arm(name: str, extra: str, describe: str) -> Arm:
    arm = _tower_arm(name, extra, "clip", describe)
    return replace(arm, overrides=(*arm.overrides, *_GROUNDING))


CLOC_QA = Claim(
    name="cloc-qa",
    title="CLOC: grounding through the MLLM with each tower",
    paper="CLOC (Chen et al. 2024): a region-aware tower lifts the MLLM's referring grounding "
    "(Ferret 50.7 -> 56.9).",
    level="mllm",
    arms=(
        _grounding_arm("clip", "clip_tower", "the demo on clip-tiny's tower, grounding turns in instruct"),
        _grounding_arm("cloc", "cloc_tower", "the demo on cloc-tiny's tower, grounding turns in instruct"),
    ),
    comparisons=(
        Comparison("cloc", "clip", Measure("refcoco", "accuracy")),
        Comparison("cloc", "clip", Measure("qa", "accuracy"), expect=0),
    ),
    benches=("refcoco", "qa"),
    budgets=MLLM_BUDGETS,
    extras=(Extra("clip_tower", "clip-tiny", 120), Extra("cloc_tower", "cloc-tiny", 120)),
    notes=(
        "Each tower is pretrained 120 steps at batch 64 on the seed's world (the cloc claim's first "
        "budget; CLOC's region loss makes its steps about twice as costly), then the whole demo trains on "
        "it with one RefCOCO-style turn per instruct image (LLaVA-1.5's grounding prompt, the box in 0-1 "
        "of the image) and max_length 320. Measure: the world's held-out referring expressions "
        "(refcoco/, 200 per seed), acc@0.5.",
    ),
)


_DINO = {"type": "dinov2", "path": "${dino}", "select_layer": -1}


def _mof(alpha: float) -> dict[str, Any]:
    return {"type": "mof_additive", "alpha": alpha, "tower2": dict(_DINO)}


# The DINO stream's own projector: a plain MLP (the paper's adapter); the anchored projector's heads are
# the warm-up's for the demo's tower and mean nothing on DINO's features
_INTERLEAVED = {"type": "mof_interleaved", "tower2": dict(_DINO), "projector2": "mlp2x_gelu"}
# ... and its look pooling both streams' tokens where it looks (FusionConfig.look): DINO reaches the
# answer position directly, not only through the LM's attention over its tokens
_INTERLEAVED_LOOK = {**_INTERLEAVED, "look": "both"}


MOF = Claim(
    name="mof",
    title="MoF: adding self-supervised features fixes CLIP's blind pairs",
    paper="Eyes Wide Shut (Tong et al. 2024): MMVP 24.7 -> 28.0 with interleaved MoF (additive trades "
    "instruction following for vision as alpha falls).",
    level="mllm",
    arms=(
        Arm("clip", "the demo (its contrastive tower, warmed up, only)"),
        Arm(
            "add75",
            "additive MoF, 0.75 x the demo's tower + 0.25 x a DINO tower (dino-tiny, frozen)",
            graft=_mof(0.75),
        ),
        Arm("add50", "additive MoF, 0.5 x the demo's tower + 0.5 x the DINO tower", graft=_mof(0.5)),
        Arm(
            "inter",
            "interleaved MoF: the demo's tower's tokens and the DINO tower's (own MLP projector, starting "
            "silent), alternating, 2 x 64 per image; the readout reads the demo's tower",
            graft=_INTERLEAVED,
        ),
        Arm(
            "inter_look",
            "interleaved MoF as above, its look pooling both streams' tokens where it looks (the demo's "
            "tower's plus DINO's at the same cells; DINO's starting silent)",
            graft=_INTERLEAVED_LOOK,
        ),
    ),
    comparisons=(
        Comparison("add75", "clip", Measure("mmvp", "accuracy")),
        Comparison("add50", "clip", Measure("mmvp", "accuracy")),
        Comparison("inter", "clip", Measure("mmvp", "accuracy")),
        Comparison("inter_look", "clip", Measure("mmvp", "accuracy")),
        Comparison("add50", "clip", Measure("qa", "accuracy"), expect=0),
        Comparison("add75", "clip", Measure("qa", "accuracy"), expect=0),
        Comparison("inter", "clip", Measure("qa", "accuracy"), expect=0),
        Comparison("inter_look", "clip", Measure("qa", "accuracy"), expect=0),
    ),
    benches=("mmvp", "qa"),
    budgets=MLLM_BUDGETS_MMVP,
    extras=(Extra("dino", "dino-tiny", 150),),
    notes=(
        "A fused arm starts from the base's warmed-up model with the DINO tower attached "
        "(MultimodalLM.with_fusion: additive, the anchored projector and the readout read the mixture; "
        "interleaved, they read the demo's tower as before and the DINO stream's projector starts silent, "
        "max_length + 64 so that each conversation keeps its text), then trains the demo's align and "
        "instruct stages; the CLIP arm is the base itself at budget 0.",
        "Interleaved, DINO reaches the answer only through the LM's attention over its tokens (inter), or "
        "also through what the look pools (inter_look); additive, through the look's mixture.",
    ),
)


def _router(mode: str) -> dict[str, Any]:
    """SVE-Math's fusion as a graft: the claim's geometric encoder (frozen) and a router whose routed
    levels are added to the tower's tokens from zero (`router_merge: residual`), so the anchored projector
    and the readout read them and the grafted model starts out as the base."""
    return {"type": "router", "geo_path": "${geo}", "router_mode": mode, "router_merge": "residual"}


#: the router trains with the projector in instruct (the demo's instruct names its trainable modules;
#: align resolves its stage kind's optional `router` by itself)
_ROUTER_TRAINS = ("stages.instruct.trainable.router=1.0e-3",)
_VISION_VERSIONS = ("Vision Dominant", "Vision Only")

SVE = Claim(
    name="svemath",
    title="SVE-Math: a perception-grounded router helps visual math",
    paper="SVE-Math (2025): GeoQA 66.5 -> 67.0 with the router against constant weights; the geometric "
    "encoder's features help most where the facts are only in the figure (MathVerse vision-dominant, "
    "vision-only).",
    level="mllm",
    arms=(
        Arm("clip", "the demo (its contrastive tower, warmed up, only)"),
        Arm(
            "constant",
            "+ a GeoGLIP-style geometric encoder (geoglip-tiny, frozen), its levels added to the tower's "
            "tokens with constant weights 0.5",
            overrides=_ROUTER_TRAINS,
            graft=_router("constant"),
        ),
        Arm(
            "router",
            "+ the same geometric encoder, its levels weighed by the learned soft router",
            overrides=_ROUTER_TRAINS,
            graft=_router("soft"),
        ),
    ),
    comparisons=tuple(
        [
            Comparison("router", "constant", Measure("mathverse", "accuracy")),
            Comparison("constant", "clip", Measure("mathverse", "accuracy")),
        ]
        + [Comparison("router", "constant", Measure("mathverse", "accuracy", v)) for v in _VISION_VERSIONS]
        + [
            Comparison("router", "clip", Measure("qa", "accuracy"), expect=0),
            Comparison("constant", "clip", Measure("qa", "accuracy"), expect=0),
        ]
    ),
    # QA's math questions are the world's own 64 px figures (the training scale): reading a drawn value,
    # or a problem's answer; shape is where geometric perception should show first
    extra_measures=tuple(
        [Measure("mathverse", "accuracy", v) for v in ("Text Dominant", "Text Lite", "Vision Intensive")]
        + [Measure("qa", "accuracy", "math"), Measure("qa", "accuracy", "shape")]
    ),
    benches=("mathverse", "qa"),
    budgets=MLLM_BUDGETS,
    extras=(
        Extra(
            "geo",
            "geoglip-tiny",
            400,
            output="geo",
            # the recipe builds its encoder inside a router-fused copy of a finished demo model
            overrides=("extra.base={run}/instruct/final", "model.tower.type=resnet"),
        ),
    ),
    notes=(
        "The geometric encoder (geoglip-tiny: boxes, junctions and boundaries from the scene graphs) is "
        "trained 400 steps at batch 32 per seed on the seed's world, then frozen. A fused arm starts from "
        "the base's warmed-up model with the encoder and a router attached (MultimodalLM.with_fusion; the "
        "router's branch starts at zero, so the graft answers as the base), then trains the demo's align "
        "and instruct with the router beside the projector; the CLIP arm is the base itself at budget 0.",
        "MathVerse: the world's 40 labelled-triangle problems in five versions (figures drawn at 256 px, "
        "seen at 64); free-form answers are integers, multi-choice ones letters. QA (no direction claimed) "
        "says whether the router costs the model its everyday sight.",
    ),
)

CLAIMS: dict[str, Claim] = {
    c.name: c
    for c in (AGLA, AGLA_WEAK, PRIOR, PRIOR_WEAK, OBJECTIVES, TIPS, TIPS_QA, CLOC, CLOC_QA, MOF, SVE)
}


def get_claim(name: str) -> Claim:
    if name not in CLAIMS:
        raise KeyError(f"unknown claim {name!r}; known: {', '.join(CLAIMS)}")
    return CLAIMS[name]
