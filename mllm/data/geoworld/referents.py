"""Which objects a GeoWorld question is about, and which image patches they cover: the grounding target
of a readout's look (mllm.readout) in training.

Why: a look learns where to attend only through the LM's answer, and the LM learns to read the look only
once it attends somewhere useful; supervising the look's attention with the objects the question names
breaks that circle (the scene graph knows them; nothing of it is needed at inference). Read from the
question's words, so it covers every question family, paraphrases and multiple choice alike:
an attribute (colour, shape, size) named exactly once in the question filters the objects; one named
twice or more is a choice the question offers ("small or large", "(a) red (b) blue") and does not;
"at/on/in the <region>" filters by region unless an "or" offers another. A question that names nothing
(`How many shapes are there?`) refers to every object; one whose filters match nothing (an absent
object) has no target.
"""

from __future__ import annotations

import re

import torch

from .scene import Scene, in_region
from .vocab import COLOR_NAMES, PLURALS, SHAPES

__all__ = ["look_target", "referents", "referent_patches", "relation_roles"]

_WORD = re.compile(r"[a-z]+")
_REGION = re.compile(
    r"\b(?:at|on|in) the (top left|top right|bottom left|bottom right|top|bottom|left|right|center)\b(?! or\b)"
)
_KIND_OF = {**{k: k for k in SHAPES}, **{p: k for k, p in PLURALS.items()}}
_SIZES = ("small", "large")
# "Is A above B?", "Is A to the left of B?": two referents, each with its own filters
_RELATION = re.compile(r"\bis (.+?) (above|below|to the left of|to the right of) (.+?)\?")


def relation_roles(scene: Scene, question: str) -> tuple[list[int], list[int]] | None:
    """For a question relating two objects, the subject's and the object's referents (each parsed on its
    own side of the relation); None for any other question."""
    m = _RELATION.search(question.lower())
    if m is None:
        return None
    return referents(scene, m.group(1)), referents(scene, m.group(3))


def referents(scene: Scene, question: str) -> list[int]:
    """Indices into `scene.shapes` of the objects `question` is about (empty for a figure scene)."""
    if scene.figure is not None or not scene.shapes:
        return []
    roles = relation_roles(scene, question)
    if roles is not None:  # both sides' objects, not every object (the words of both, mixed, filter nothing)
        return sorted(set(roles[0]) | set(roles[1]))
    q = question.lower()
    words = _WORD.findall(q)
    colours = [w for w in words if w in COLOR_NAMES]
    kinds = [_KIND_OF[w] for w in words if w in _KIND_OF]
    sizes = [w for w in words if w in _SIZES]
    regions = _REGION.findall(q)
    keep = []
    for i, s in enumerate(scene.shapes):
        if len(colours) == 1 and s.color != colours[0]:
            continue
        if len(kinds) == 1 and s.kind != kinds[0]:
            continue
        if len(sizes) == 1 and s.size != sizes[0]:
            continue
        if len(regions) == 1 and not in_region(s.region, regions[0]):
            continue
        keep.append(i)
    return keep


def look_target(scene: Scene, question: str, grid: tuple[int, int]) -> torch.Tensor:
    """The grounding target of a look asking `question` (`referent_patches`), a relation's object marked
    apart from its subject."""
    roles = relation_roles(scene, question)
    if roles is not None and scene.figure is None:
        return referent_patches(scene, roles[0], grid, second=roles[1])
    return referent_patches(scene, referents(scene, question), grid)


def referent_patches(
    scene: Scene, objects: list[int], grid: tuple[int, int], second: list[int] | tuple[int, ...] = ()
) -> torch.Tensor:
    """[gh * gw] float: 1 on the patches (row-major) whose centre lies in the box of one of `objects`, 2 on
    the patch holding each one's centre point (so a row also says how many objects it names: a readout
    that counts, mllm.readout, learns from it); `second` (a relation's object): 3 and 4 the same way."""
    gh, gw = grid
    out = torch.zeros(gh * gw)
    for i, base in [(i, 0.0) for i in objects] + [(i, 2.0) for i in second]:
        s = scene.shapes[i]
        x1, y1, x2, y2 = s.box
        for r in range(gh):
            cy = (r + 0.5) * scene.height / gh
            if not y1 <= cy < y2:
                continue
            for c in range(gw):
                cx = (c + 0.5) * scene.width / gw
                if x1 <= cx < x2:
                    out[r * gw + c] = base + 1.0
        r, c = min(int(s.y * gh / scene.height), gh - 1), min(int(s.x * gw / scene.width), gw - 1)
        out[r * gw + c] = base + 2.0  # its centre (also where a small object between patch centres is)
    return out
