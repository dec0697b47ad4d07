"""RefCOCO/+/g in the layouts they are published in, each read into the same grounding items.

`REFCOCO_LAYOUTS` (a registry; `layout=` picks one, else the one whose files are in the folder):

- `mllm`: our JSONL (`refcoco_{split}.jsonl`, or `file=`), lines {"id", "image", "width", "height",
  "sentence", "bbox": [x1, y1, x2, y2]} in pixels; what `mllm synth` writes. Item id: `id`.
- `lmms-lab`: the rows of lmms-lab/RefCOCO (and RefCOCO+/g, same columns) as lmms-eval reads them:
  `question_id`, `image` (embedded: {"bytes", "path"}), `question`, `answer` (the list of referring
  sentences), `bbox` [x, y, w, h] in pixels, `file_name`; parquet (`data/{split}-*.parquet`, needs
  pyarrow: `pip install 'mllm[eval]'`) or the same rows as JSON lines (`{split}.jsonl`, images by
  `file_name`). One item per sentence, id "{question_id}/{k}" (k from 0), as lmms-eval's task explodes
  a row into one sample per sentence. Embedded images are written once under the image folder
  (default DATA/images) by their file name, so generation opens them like any other image.
- `refer`: refer's own files (lichengunc/refer: `refs(unc).p`, `refs(google).p` or `refs(umd).p`
  beside `instances.json`), the split (`val`, `testA`, ...) chosen by each ref's `split`; images are
  the COCO train2014 files named in `instances.json` (`images=` points at them). One item per
  sentence, id its `sent_id`. The pickle is read by `plain_pickle`, which loads no global.

Every layout checks each box and size: a box with zero (or negative) width or height is an error
naming the file and the row or id, so scoring never meets a degenerate one.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from encoders.registry import Registry
from mllm.data.grounding import PROMPT
from mllm.data.images import ImageError, resolve_image

from .core import BenchmarkError, Item, image_file, need_keys, read_json_lines
from .plain_pickle import load_plain

SPLITS = ("val", "test", "testA", "testB", "train")
REFER_SPLIT_BYS = ("unc", "google", "umd")


@dataclass(frozen=True)
class Source:
    """Where one layout's files are and how to read them (`read` gets what `find` returned)."""

    data_dir: Path
    split: str
    img_root: Path
    file: str | None = None
    split_by: str | None = None


@dataclass(frozen=True)
class RefLayout:
    """A registry entry: a published RefCOCO layout."""

    name: str
    doc: str
    find: Callable[[Source], list[Path]]  # the layout's files for this split (empty: not this layout)
    read: Callable[[Source, list[Path]], list[Item]]


REFCOCO_LAYOUTS: Registry[RefLayout] = Registry("RefCOCO layout")


def number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def make_item(
    ident: str,
    sentence: Any,
    box: Any,
    width: Any,
    height: Any,
    image: Path,
    image_name: str,
    where: str,
    extra: dict[str, Any] | None = None,
) -> Item:
    """A grounding item, its box [x1, y1, x2, y2] in pixels checked: finite, inside-out never, and with
    a positive width and height (a degenerate box cannot be overlapped and would score every answer 0)."""
    if not (number(width) and number(height) and width > 0 and height > 0):
        raise BenchmarkError(
            f"{where} (id {ident}): width/height {width!r}x{height!r} are not positive numbers"
        )
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(number(v) for v in box)):
        raise BenchmarkError(f"{where} (id {ident}): bbox {box!r} is not four numbers")
    if not (box[2] > box[0] and box[3] > box[1]):
        raise BenchmarkError(
            f"{where} (id {ident}): degenerate bbox {list(box)!r} (zero or negative width or height)"
        )
    if not isinstance(sentence, str) or not sentence.strip():
        raise BenchmarkError(f"{where} (id {ident}): sentence {sentence!r} is not a non-empty string")
    meta = {
        "sentence": sentence,
        "bbox": [float(v) for v in box],
        "width": width,
        "height": height,
        "image": image_name,
        **(extra or {}),
    }
    return Item(id=ident, prompt=PROMPT.format(sentence=sentence), image=image, meta=meta)


def xywh(box: Any, where: str) -> list[float]:
    """COCO's [x, y, w, h] as [x1, y1, x2, y2]; the error names the row when it is not four numbers."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(number(v) for v in box)):
        raise BenchmarkError(f"{where}: bbox {box!r} is not [x, y, w, h]")
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


# --------------------------------------------------------------------------------------------------
# mllm: our JSONL
# --------------------------------------------------------------------------------------------------


def _lmms_row(path: Path) -> bool:
    """Whether a JSON-lines file's first row is an lmms-lab row (question_id and a list of sentences)."""
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False  # not ours to judge: the reader names the bad line
                return isinstance(row, dict) and "question_id" in row and isinstance(row.get("answer"), list)
    return False


def _find_mllm(src: Source) -> list[Path]:
    path = src.data_dir / (src.file or f"refcoco_{src.split}.jsonl")
    return [path] if path.is_file() and path.suffix != ".parquet" and not _lmms_row(path) else []


def _read_mllm(src: Source, paths: list[Path]) -> list[Item]:
    (path,) = paths
    items = []
    for n, row in read_json_lines(path):
        where = f"{path}:{n}"
        need_keys(row, ("id", "image", "width", "height", "sentence", "bbox"), where)
        ident = str(row["id"])
        image = image_file(src.img_root, row["image"], f"{where} (id {ident})")
        items.append(
            make_item(
                ident,
                str(row["sentence"]),
                row["bbox"],
                row["width"],
                row["height"],
                image,
                row["image"],
                where,
            )
        )
    return items


# --------------------------------------------------------------------------------------------------
# lmms-lab/RefCOCO rows
# --------------------------------------------------------------------------------------------------

LMMS_COLUMNS = ("question_id", "image", "answer", "bbox", "file_name")


def _find_lmms(src: Source) -> list[Path]:
    if src.file is not None:
        path = src.data_dir / src.file
        return [path] if path.is_file() and (path.suffix == ".parquet" or _lmms_row(path)) else []
    for folder in (src.data_dir / "data", src.data_dir):
        found = sorted(folder.glob(f"{src.split}-*.parquet"))
        if found:
            return found
    for folder in (src.data_dir / "data", src.data_dir):
        found = sorted(folder.glob(f"{src.split}.jsonl")) + sorted(folder.glob(f"{src.split}-*.jsonl"))
        if found:
            return found
    return []


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        # Optional dependency (the `eval` extra), imported only when a parquet file is read.
        import pyarrow.parquet as pq
    except ImportError as e:
        raise BenchmarkError(
            f"{path}: reading lmms-lab/RefCOCO's parquet files needs pyarrow (pip install 'mllm[eval]')"
        ) from e
    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        batches = pf.iter_batches(batch_size=64, columns=[c for c in LMMS_COLUMNS if c in names])
        n = 0
        for batch in batches:  # a batch at a time: the embedded images of a split are gigabytes
            for row in batch.to_pylist():
                n += 1
                yield f"{path} row {n}", row
    except BenchmarkError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError, ...) all mean unreadable
        raise BenchmarkError(f"{path}: not a readable parquet file: {e}") from e


def _lmms_rows(paths: list[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in paths:
        if path.suffix == ".parquet":
            yield from _parquet_rows(path)
        else:
            for n, row in read_json_lines(path):
                yield f"{path}:{n}", row


def _image_size(data: bytes | Path, where: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.size  # the header only: nothing is decoded
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BenchmarkError(f"{where}: image cannot be read: {e}") from e


def _lmms_image(
    src: Source, row: dict[str, Any], where: str, sizes: dict[str, tuple[int, int]]
) -> tuple[Path, str, tuple[int, int]]:
    """(path, name, (width, height)) of a row's image; an embedded one is written under its file name."""
    img = row.get("image")
    data = img.get("bytes") if isinstance(img, dict) else img if isinstance(img, bytes) else None
    name = row.get("file_name") or (img.get("path") if isinstance(img, dict) else None)
    if not isinstance(name, str) or not name:
        raise BenchmarkError(f"{where}: no file_name (nor image path) to name the image by")
    if name in sizes:
        return resolve_image(src.img_root, name), name, sizes[name]
    if data is None:
        path = image_file(src.img_root, name, where)
        sizes[name] = _image_size(path, f"{where}: {path}")
        return path, name, sizes[name]
    try:
        path = resolve_image(src.img_root, name)
    except ImageError as e:
        raise BenchmarkError(f"{where}: {e}") from e
    sizes[name] = _image_size(data, where)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        part.write_bytes(data)
        part.replace(path)  # never a half-written image under the real name
    return path, name, sizes[name]


def _read_lmms(src: Source, paths: list[Path]) -> list[Item]:
    items: list[Item] = []
    sizes: dict[str, tuple[int, int]] = {}
    for where, row in _lmms_rows(paths):
        need_keys(row, ("question_id", "answer", "bbox"), where)
        qid = row["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise BenchmarkError(f"{where}: question_id {qid!r} is not a string or an integer")
        qid = str(qid)
        here = f"{where} (question_id {qid})"
        sentences = row["answer"]
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(sentences, list) or not sentences:
            raise BenchmarkError(f"{here}: answer {sentences!r} is not a list of referring sentences")
        box = xywh(row["bbox"], here)
        path, name, (width, height) = _lmms_image(src, row, here, sizes)
        for k, sentence in enumerate(sentences):
            extra = {"question_id": qid, "sentence_index": k}
            items.append(make_item(f"{qid}/{k}", sentence, box, width, height, path, name, where, extra))
    return items


# --------------------------------------------------------------------------------------------------
# refer: refs(<split_by>).p + instances.json
# --------------------------------------------------------------------------------------------------


def _find_refer(src: Source) -> list[Path]:
    instances = src.data_dir / "instances.json"
    if not instances.is_file():
        return []
    if src.split_by is not None:
        refs = src.data_dir / f"refs({src.split_by}).p"
        return [refs, instances] if refs.is_file() else []
    found = sorted(src.data_dir.glob("refs(*).p"))
    if len(found) > 1:
        raise BenchmarkError(
            f"{src.data_dir}: several refer splits {[p.name for p in found]}; choose one with split_by= "
            f"({', '.join(REFER_SPLIT_BYS)})"
        )
    return [found[0], instances] if found else []


def _by_id(rows: Any, what: str, path: Path) -> dict[Any, dict[str, Any]]:
    if not isinstance(rows, list):
        raise BenchmarkError(f"{path}: {what} is not a list")
    out = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "id" not in r:
            raise BenchmarkError(f"{path}: {what}[{i}] is not an object with an id")
        out[r["id"]] = r
    return out


def _read_refer(src: Source, paths: list[Path]) -> list[Item]:
    refs_path, instances_path = paths
    refs = load_plain(refs_path)
    if not isinstance(refs, list):
        raise BenchmarkError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    try:
        instances = json.loads(instances_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{instances_path}: not valid JSON: {e}") from e
    if not isinstance(instances, dict):
        raise BenchmarkError(f"{instances_path}: expected an object with images and annotations")
    images = _by_id(instances.get("images"), "images", instances_path)
    anns = _by_id(instances.get("annotations"), "annotations", instances_path)
    splits: set[str] = set()
    items: list[Item] = []
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise BenchmarkError(f"{refs_path}: ref #{i} is not a dict")
        where = f"{refs_path} (ref #{i}, ref_id {ref.get('ref_id')})"
        need_keys(ref, ("ref_id", "ann_id", "image_id", "split", "sentences"), where)
        splits.add(str(ref["split"]))
        if ref["split"] != src.split:
            continue
        ann = anns.get(ref["ann_id"])
        if ann is None:
            raise BenchmarkError(f"{where}: ann_id {ref['ann_id']} is not in {instances_path}")
        im = images.get(ref["image_id"])
        if im is None:
            raise BenchmarkError(f"{where}: image_id {ref['image_id']} is not in {instances_path}")
        need_keys(im, ("file_name", "width", "height"), f"{instances_path} (image {ref['image_id']})")
        box = xywh(ann.get("bbox"), f"{where} (ann_id {ref['ann_id']})")
        image = image_file(src.img_root, im["file_name"], where)
        if not isinstance(ref["sentences"], list):
            raise BenchmarkError(f"{where}: sentences is not a list")
        for s in ref["sentences"]:
            if not isinstance(s, dict) or "sent_id" not in s:
                raise BenchmarkError(f"{where}: a sentence without a sent_id: {s!r}")
            extra = {"ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "sent_id": s["sent_id"]}
            sentence = s.get("sent") or s.get("raw")
            items.append(
                make_item(
                    str(s["sent_id"]),
                    sentence,
                    box,
                    im["width"],
                    im["height"],
                    image,
                    im["file_name"],
                    where,
                    extra,
                )
            )
    if src.split not in splits:
        raise BenchmarkError(f"{refs_path}: no refs in split {src.split!r}; its splits are {sorted(splits)}")
    return items


REFCOCO_LAYOUTS.register(
    "mllm",
    RefLayout(
        "mllm",
        "refcoco_{split}.jsonl (or file=): {id, image, width, height, sentence, bbox x1y1x2y2}",
        _find_mllm,
        _read_mllm,
    ),
)
REFCOCO_LAYOUTS.register(
    "lmms-lab",
    RefLayout(
        "lmms-lab",
        "lmms-lab/RefCOCO rows: data/{split}-*.parquet (pyarrow) or {split}.jsonl; bbox xywh, sentences in answer",
        _find_lmms,
        _read_lmms,
    ),
)
REFCOCO_LAYOUTS.register(
    "refer",
    RefLayout(
        "refer",
        "refer's refs(unc|google|umd).p + instances.json, refs chosen by split",
        _find_refer,
        _read_refer,
    ),
)


def read_source(src: Source, layout: str | None = None) -> tuple[str, list[Item]]:
    """(layout name, items) of the layout `layout` names, or of the one layout whose files are there."""
    if layout is not None:
        lay = REFCOCO_LAYOUTS[layout]
        paths = lay.find(src)
        if not paths:
            raise FileNotFoundError(
                f"RefCOCO: no {lay.name} files ({lay.doc}) for split {src.split!r} in {src.data_dir}"
            )
        return lay.name, lay.read(src, paths)
    found = [(lay, paths) for lay in REFCOCO_LAYOUTS.values() if (paths := lay.find(src))]
    if not found:
        looked = "; ".join(f"{lay.name}: {lay.doc}" for lay in REFCOCO_LAYOUTS.values())
        raise FileNotFoundError(
            f"RefCOCO: no files for split {src.split!r} in {src.data_dir} (looked for {looked})"
        )
    if len(found) > 1:
        raise BenchmarkError(
            f"{src.data_dir}: files of several RefCOCO layouts ({', '.join(lay.name for lay, _ in found)}); "
            "choose one with layout="
        )
    lay, paths = found[0]
    return lay.name, lay.read(src, paths)
