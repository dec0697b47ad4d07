"""GeoWorld drawn on the fly: a fresh scene for every training sample, never a held-out one.

Why: a fixed set of a few thousand scenes is seen five times over in the demo's budget and the model
memorises it, while GeoWorld renders hundreds of images a second and the loader has ~70x headroom
over a training step. Sample `i` is a pure function of `(seed, i)` (its own RNG stream), so the
engine's resumable batch order makes a killed run continue with exactly the samples it would have
seen; nothing is stored.

Held-out hygiene: every scene of a world's benchmark sets (`eval/`, `mmvp/`, `mmvp_vlm/`, `pope/`,
`refcoco/`, `mathverse/`) is rendered once at start-up and its pixels hashed; a live draw whose plain
rendering equals one of them is redrawn from the next attempt of its stream. No held-out item or its
scene can enter training.

What a sample says (`content`):
- "qa": many turns about one image (image tokens are the costly part of a step, so more questions per
  forward pass are nearly free supervision): GeoWorld's own questions (`language.qa_pool`), extra
  POPE-style existence probes with near-miss negatives, training-only paraphrases (MMVP's wording:
  "Which direction ...", "... side of the image?", "... to the left or to the right of ...") and a
  share asked as two-option multiple choice.
  With `grounding`, RefCOCO-style turns too: a referring phrase in LLaVA-1.5's grounding prompt, answered
  with the object's box (`grounding_turns`).
- "caption": an alignment caption (`language.align_caption`), as in `align.json`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mllm.chat import SampleError, check_image_placement, encode_conversation, with_image
from mllm.config import LiveWorldConfig, from_dict
from mllm.data.grounding import PROMPT as GROUNDING_PROMPT
from mllm.data.grounding import box_answer

from .augment import AugmentConfig, render_augmented
from .files import read_jsonl
from .language import ALIGN_PROMPTS, QA, align_caption, multiple_choice, pick_turns, qa_pool, refer_all
from .referents import look_target
from .render import render
from .sampling import pixel_key, stream, world_scene
from .scene import Scene, scene_from_dict
from .vocab import COLOR_NAMES, SHAPES, with_article

#: How a two-option question is answered in training (LiveWorldConfig.mc_reply).
MC_REPLIES: tuple[str, ...] = ("letter", "option", "both")

#: Benchmark folders of a written world whose scenes training must never draw.
HELDOUT_SETS: tuple[str, ...] = ("eval", "mmvp", "mmvp_vlm", "pope", "refcoco", "mathverse")


def heldout_keys(world: str | Path) -> set[bytes]:
    """Pixel hashes of the plain rendering of every held-out scene in `world`."""
    world = Path(world)
    if not (world / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{world}: not a GeoWorld folder (no manifest.json); "
            "data.live.heldout must name the world whose benchmarks training must avoid"
        )
    keys: set[bytes] = set()
    for name in HELDOUT_SETS:
        path = world / name / "scenes.jsonl"
        if path.is_file():
            for row in read_jsonl(path):
                keys.add(pixel_key(render(scene_from_dict(row["scene"]))))
    return keys


# ------------------------------------------------------------------------------- training-only wording

_DIRECTION = re.compile(r"^Which way is (.+) pointing\?$")
_SIDE = re.compile(r"^Is (.+) on the left or the right\?$")
_LEFT_OF = re.compile(r"^Is (.+) to the left of (.+)\?$")
_ABOVE = re.compile(r"^Is (.+) above (.+)\?$")


def paraphrase(question: str, answer: str) -> QA | None:
    """The same question in another wording a user (or a benchmark) might use, or None."""
    if m := _DIRECTION.match(question):
        return f"Which direction is {m[1]} pointing?", answer
    if m := _SIDE.match(question):
        return f"Is {m[1]} on the left or the right side of the image?", answer
    if m := _LEFT_OF.match(question):
        return f"Is {m[1]} to the left or to the right of {m[2]}?", "left" if answer == "yes" else "right"
    if m := _ABOVE.match(question):
        return f"Is {m[1]} above or below {m[2]}?", "above" if answer == "yes" else "below"
    return None


_PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"), ("above", "below"))


def two_options(category: str, question: str, answer: str, rng: random.Random) -> QA | None:
    """`language.multiple_choice`, extended to the two-way spatial answers MMVP also asks about."""
    for pair in _PAIRS:
        if answer in pair:
            opts = list(pair)
            rng.shuffle(opts)
            return f"{question} (a) {opts[0]} (b) {opts[1]}", "(a)" if opts[0] == answer else "(b)"
    return multiple_choice(category, question, answer, rng)


def existence_probes(
    scene: Scene, rng: random.Random, k: int, yes: float = 0.5, near_share: float = 0.5
) -> list[QA]:
    """`k` POPE-style "Is there a {colour} {shape} in the image?" probes: yes and no alternating at the
    demo's `yes` 0.5, else each "yes" with probability `yes`.

    Negatives are near misses with probability `near_share` (a present shape in another colour, or a
    present colour on another shape): that is what POPE's adversarial split asks, and what a model that
    only reads "there is something red" gets wrong.
    """
    present = sorted(scene.objects())
    kinds = {s.kind for s in scene.shapes}
    colours = {s.color for s in scene.shapes}
    absent = [f"{c} {s}" for s in SHAPES for c in COLOR_NAMES if f"{c} {s}" not in present]
    near = [o for o in absent if o.split()[1] in kinds or o.split()[0] in colours]
    out: list[QA] = []
    first_yes = rng.random() < 0.5
    for j in range(k):
        says_yes = (j % 2 == 0) == first_yes if yes == 0.5 else rng.random() < yes
        if says_yes and present:
            obj = rng.choice(present)
            out.append((f"Is there {with_article(obj)} in the image?", "yes"))
        else:
            obj = rng.choice(near if near and rng.random() < near_share else absent)
            out.append((f"Is there {with_article(obj)} in the image?", "no"))
    return out


def grounding_turns(scene: Scene, rng: random.Random, k: int) -> list[QA]:
    """`k` RefCOCO-style turns: a phrase naming exactly one object (`language.refer_all`, minimal and
    over-specified phrases alike, as the benchmark's are drawn), asked in LLaVA-1.5's grounding prompt and
    answered with that object's box in 0-1 of the image. Objects no phrase singles out are not asked."""
    out: list[QA] = []
    for _ in range(k):
        index = rng.randrange(len(scene.shapes))
        phrases = refer_all(scene, index)
        if phrases:
            box = box_answer(scene.shapes[index].box, scene.width, scene.height)
            out.append((GROUNDING_PROMPT.format(sentence=rng.choice(phrases)), box))
    return out


def qa_turns(scene: Scene, rng: random.Random, cfg: LiveWorldConfig) -> list[QA]:
    """The question/answer turns of one live sample (see the module docstring)."""
    lo, hi = cfg.turns
    picks = pick_turns(qa_pool(scene, rng, cfg.existence_yes, cfg.existence_near), rng, lo, hi)
    if scene.figure is None and cfg.existence:
        probes = existence_probes(scene, rng, cfg.existence, cfg.existence_yes, cfg.existence_near)
        picks += [("existence", qa) for qa in probes]
    if scene.figure is None and cfg.grounding:
        picks += [("grounding", qa) for qa in grounding_turns(scene, rng, cfg.grounding)]
    rng.shuffle(picks)
    turns: list[QA] = []
    for cat, (q, a) in picks:
        if rng.random() < cfg.paraphrase_frac:
            q, a = paraphrase(q, a) or (q, a)
        if rng.random() < cfg.mc_frac:
            q, letter = two_options(cat, q, a, rng) or (q, a)
            a = {"letter": letter, "option": a, "both": f"{a} {letter}" if letter != a else a}[cfg.mc_reply]
        turns.append((q, a))
    return turns


def conversation(turns: Sequence[QA], placement: str = "before") -> list[dict[str, str]]:
    """LLaVA-format turns; the image marker goes beside the first question (`mllm.chat.with_image`)."""
    conv = []
    for j, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": with_image(q, placement) if j == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


class LiveWorldDataset(Dataset):
    """`cfg.n` virtual samples, each a freshly drawn GeoWorld scene with its text (see module doc).

    Returns the same items as `mllm.data.conversations.ConversationDataset`, so the collators,
    packing and the engine cannot tell the two apart.
    """

    def __init__(
        self,
        cfg: LiveWorldConfig,
        tokenizer: Any,
        template: str,
        image_token_id: int,
        num_image_tokens: int,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor],
        max_length: int | None,
        image_placement: str = "before",
    ):
        if cfg.content not in ("qa", "caption"):
            raise ValueError(f"data.live.content must be 'qa' or 'caption', got {cfg.content!r}")
        if cfg.mc_reply not in MC_REPLIES:
            raise ValueError(
                f"data.live.mc_reply must be one of {', '.join(MC_REPLIES)}, got {cfg.mc_reply!r}"
            )
        if cfg.grounding < 0:
            raise ValueError(f"data.live.grounding must be 0 or more turns per image, got {cfg.grounding}")
        if cfg.n < 1:
            raise ValueError(f"data.live.n must be positive, got {cfg.n}")
        lo, hi = cfg.turns
        if not 1 <= lo <= hi:
            raise ValueError(f"data.live.turns must be [lo, hi] with 1 <= lo <= hi, got {list(cfg.turns)}")
        self.placement = check_image_placement(image_placement)  # fails here, not at the first sample
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.preprocess = preprocess
        self.max_length = max_length
        self.excluded = heldout_keys(cfg.heldout) if cfg.heldout else set()
        # A readout's look token (MultimodalLM.meta.look_token), set by the family that builds the task,
        # and the tower's patch grid when the looks are supervised with the question's referents
        # (`look_targets`, mllm.data.geoworld.referents).
        self.look_token: str | None = None
        self.look_at: str = "question"
        self.look_grid: tuple[int, int] | None = None
        self.redrawn = 0
        self.augment = (
            from_dict(AugmentConfig, cfg.augment, "data.live.augment") if cfg.augment is not None else None
        )

    def _image(self, scene: Scene, rng: random.Random) -> Image.Image:
        # No config means GeoWorld's exact pixels (render_augmented(None) would use AugmentConfig's defaults).
        return render(scene) if self.augment is None else render_augmented(scene, rng, self.augment)

    def __len__(self) -> int:
        return self.cfg.n

    def max_shapes(self, i: int) -> int:
        """The most objects sample `i` may hold: 1 at the start of a curriculum, `max_shapes` after it."""
        c = self.cfg.curriculum
        if c <= 0 or i >= c:
            return self.cfg.max_shapes
        return 1 + (i * self.cfg.max_shapes) // c

    def scene(self, i: int) -> tuple[Scene, random.Random]:
        """Sample `i`'s scene (never a held-out one) and the RNG its text and augmentation continue from."""
        for attempt in range(100):
            rng = stream(self.cfg.seed, "live", i, attempt)
            scene = world_scene(rng, self.cfg.size, self.cfg.math_frac, self.max_shapes(i))
            if not self.excluded or pixel_key(render(scene)) not in self.excluded:
                return scene, rng
            self.redrawn += 1
        raise RuntimeError(f"live GeoWorld sample {i}: 100 draws in a row were held-out scenes")

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene, rng = self.scene(i)
        name = f"live GeoWorld sample #{i} (seed {self.cfg.seed})"
        if self.cfg.content == "caption":
            conv = [
                {"from": "human", "value": f"{rng.choice(ALIGN_PROMPTS)}\n<image>"},
                {"from": "gpt", "value": align_caption(scene, rng)},
            ]
        else:
            turns = qa_turns(scene, rng, self.cfg)
            conv = conversation(turns, self.placement)
        image = self._image(scene, rng)
        enc = self._encode(conv, name)
        out = {"index": i, "id": f"live-{i}", **enc, "pixel_values": self.preprocess([image])}
        if self.look_grid is not None and self.look_token is not None:
            # one row per look that survived `_encode` (it drops whole trailing turns), in turn order
            out["look_targets"] = torch.stack(
                [look_target(scene, t["value"], self.look_grid) for t in conv[::2]]
            )[: self._looks(enc)]
        return out

    def _looks(self, enc: dict[str, torch.Tensor]) -> int:
        look_id = self.tokenizer.convert_tokens_to_ids(self.look_token)
        return int((enc["input_ids"] == look_id).sum())

    def _encode(self, conv: list[dict[str, str]], name: str) -> dict[str, torch.Tensor]:
        """Tokenise; a conversation longer than max_length loses whole trailing turns (never a part)."""
        while True:
            try:
                return encode_conversation(
                    conv,
                    self.tokenizer,
                    self.template,
                    self.image_token_id,
                    self.num_image_tokens,
                    num_images=1,
                    max_length=self.max_length,
                    sample=name,
                    look_token=self.look_token,
                    look_at=self.look_at,
                )
            except SampleError as e:
                if "exceed max_length" not in str(e) or len(conv) <= 2:
                    raise
                conv = conv[:-2]
