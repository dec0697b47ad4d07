"""Zero-shot image<->text retrieval on held-out GeoWorld: Recall@1 and Recall@5 in both directions.

Data: a captions file `{"id", "image", "short", "long"}` per line; by default the world's held-out
`eval/captions.jsonl` (give the world root or its `eval/` folder, as for `qa`). Every image queries all
captions (image->text) and every caption queries all images (text->image).

Items are the queries: `i2t/<id>` (an image) and `t2i/<id>` (a caption). A response is the ranked ids
of the retrieved side, best first, comma-separated (at least `k` of them for R@k), so rankings made by
any other codebase are scored by the same rule. A retrieved caption counts as right when its text is
the query image's caption text (and a retrieved image when its caption text is the query's): two
images with the same exact caption are indistinguishable by the caption, so neither is counted wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mllm.data.images import load_image

from .core import (
    Benchmark,
    Item,
    base_record,
    check_options,
    check_unique,
    image_file,
    lookup,
    need_keys,
    percent,
    read_json_lines,
    register_benchmark,
    require_file,
)

OPTIONS = ("file", "images", "caption")
DEFAULT_FILE = "eval/captions.jsonl"
KS = (1, 5)
DIRECTIONS = ("i2t", "t2i")


def load(
    data_dir: Path,
    *,
    file: str = DEFAULT_FILE,
    images: str | None = None,
    caption: str = "long",
    **other: Any,
) -> list[Item]:
    """Two queries per line: the image (`i2t/<id>`) and its caption (`t2i/<id>`)."""
    check_options("retrieval", other, OPTIONS)
    if caption not in ("long", "short"):
        raise ValueError(f"retrieval: caption must be 'long' or 'short', got {caption!r}")
    data_dir = Path(data_dir)
    path, root = data_dir / file, data_dir
    if not path.is_file() and file == DEFAULT_FILE and (data_dir / "captions.jsonl").is_file():
        path, root = data_dir / "captions.jsonl", data_dir.parent  # given the eval/ folder itself
    require_file(path, "retrieval captions")
    img_root = Path(images) if images is not None else root
    rows = []
    for n, row in read_json_lines(path):
        where = f"{path}:{n}"
        need_keys(row, ("id", "image", caption), where)
        rows.append(
            (
                str(row["id"]),
                image_file(img_root, row["image"], f"{where} (id {row['id']})"),
                str(row[caption]),
            )
        )
    items = [
        Item(f"i2t/{i}", text, img, {"direction": "i2t", "key": i, "text": text}) for i, img, text in rows
    ]
    items += [
        Item(f"t2i/{i}", text, img, {"direction": "t2i", "key": i, "text": text}) for i, img, text in rows
    ]
    check_unique(items, str(path))
    return items


def rankings(
    sim: torch.Tensor, keys: list[str], k: int = max(KS), t2i: torch.Tensor | None = None
) -> dict[str, list[list[str]]]:
    """sim [images, captions] (row i = image of keys[i], column j = caption of keys[j]) -> the top-k
    keys per query: {"i2t": per image, "t2i": per caption}. Captions rank images by `t2i` [captions,
    images] where the model scores that direction its own way (FILIP), else by sim's transpose. Ties go
    to the lower index (stable)."""
    t2i = sim.T if t2i is None else t2i
    for name, m in (("sim", sim), ("t2i", t2i)):
        if m.dim() != 2 or m.shape != (len(keys), len(keys)):
            raise ValueError(f"expected a [{len(keys)}, {len(keys)}] {name} matrix, got {tuple(m.shape)}")
    k = min(k, len(keys))
    out = {}
    for name, m in (("i2t", sim), ("t2i", t2i)):
        order = torch.sort(m.float(), dim=1, descending=True, stable=True).indices[:, :k]
        out[name] = [[keys[j] for j in row] for row in order.tolist()]
    return out


def score(items: list[Item], responses: dict[str, str], **opts: Any) -> tuple[dict, list[dict]]:
    check_options("retrieval", opts, OPTIONS)
    text_of = {it.meta["key"]: it.meta["text"] for it in items if it.meta["direction"] == "i2t"}
    hits = {(d, k): 0 for d in DIRECTIONS for k in KS}
    count = dict.fromkeys(DIRECTIONS, 0)
    records = []
    for it, resp, missing in lookup(items, responses, "retrieval"):
        ranked = [r.strip() for r in resp.split(",") if r.strip()]
        d = it.meta["direction"]
        right = [text_of.get(r) == it.meta["text"] for r in ranked]
        first = next((i + 1 for i, ok in enumerate(right) if ok), None)
        count[d] += 1
        for k in KS:
            hits[(d, k)] += first is not None and first <= k
        records.append(
            dict(
                base_record(it, resp, missing, ranked[: max(KS)], first == 1),
                direction=d,
                rank_of_first_right=first,
            )
        )
    metrics: dict[str, Any] = {f"{d}_R@{k}": percent(hits[(d, k)], count[d]) for d in DIRECTIONS for k in KS}
    for k in KS:
        metrics[f"mean_R@{k}"] = (metrics[f"i2t_R@{k}"] + metrics[f"t2i_R@{k}"]) / 2
    metrics["queries"] = dict(count)
    return metrics, records


@torch.no_grad()
def respond(model: Any, items: list[Item], batch_size: int = 64, **opts: Any) -> dict[str, str]:
    """Rank every caption for every image and back (`model`: an encoders.ContrastiveModel)."""
    queries = [it for it in items if it.meta["direction"] == "i2t"]
    keys = [it.meta["key"] for it in queries]
    images = [load_image(it.image) for it in queries]
    i2t, t2i = model.match_scores(images, [it.meta["text"] for it in queries], batch_size)
    ranked = rankings(i2t, keys, t2i=t2i)
    out = {f"i2t/{key}": ",".join(r) for key, r in zip(keys, ranked["i2t"])}
    out.update({f"t2i/{key}": ",".join(r) for key, r in zip(keys, ranked["t2i"])})
    return out


register_benchmark(
    Benchmark("retrieval", "id", load, score, options=OPTIONS, respond=respond, model_kind="contrastive")
)
