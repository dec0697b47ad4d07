"""Frozen-tower feature cache: a stage that freezes the tower computes its outputs once per dataset.

Why: in `align` and `prior` only the projector trains, yet every epoch decodes, preprocesses and
runs each image through the tower again, and the result is the same every time. Computed once and
stored, the tower's pre-projector tokens (`MultimodalLM.tower_features`, the input of
`project_features`) turn each later step into a table lookup plus projector + LM.

What is stored: `shard-NNNNN.safetensors` files holding one `[N, D]` tensor per distinct image, in
float16 (default) or bfloat16, named by the sha256 of the image *file bytes*, plus `manifest.json`
with the fingerprint and the index (image hash -> shard). Keying by content, not path, means a
changed image is a miss, never a silently reused entry; several datasets over the same images
share entries.

Fingerprint (`tower_fingerprint`): the sha256 of the tower's whole state dict, its class, HF config,
preprocessing (the image processor's settings and pad-to-square), select_layer / select_feature and
the stored dtype. A cache whose fingerprint differs is refused with what changed (`StaleCacheError`,
the PRIOR cache's rule); by default each tower gets its own folder
(`<data dir>/feature_cache/<fingerprint digest>`), so only an explicit `data.feature_cache_dir` can
be stale. A build over an existing cache computes only the images it lacks, shard by shard, with the
manifest rewritten after each shard, so an interrupted build resumes.

Limits: augmentation-free pipelines only. A cached feature is the tower's output for the one
deterministic preprocessing of that file; random crops, flips or colour jitter would make every
epoch's input different, and a cache would silently train on one frozen draw. The cache is also
refused when the stage trains any part of the tower.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from encoders.common import barrier, device, is_main, read_meta, write_meta
from mllm.chat import SampleError
from mllm.config import StageConfig
from mllm.data.conversations import ConversationDataset, image_paths
from mllm.data.images import ImageError, load_image, resolve_image
from mllm.model import MultimodalLM
from mllm.prior import StaleCacheError, digest, model_fingerprint

CACHE_KIND = "feature_cache"
CACHE_VERSION = 1
MANIFEST_FILE = "manifest.json"  # the cache folder's meta file (kind, format_version, fingerprint, index)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = [
    "FeatureCache",
    "StaleCacheError",
    "attach",
    "build_cache",
    "check_frozen",
    "default_cache_dir",
    "file_hash",
    "tower_fingerprint",
]


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes (the cache key of an image)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(x: Any) -> Any:
    """JSON-able form of configs (dataclasses, HF configs, processors) for the fingerprint."""
    if is_dataclass(x) and not isinstance(x, type):
        x = asdict(x)
    elif hasattr(x, "to_dict"):
        x = x.to_dict()
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def tower_fingerprint(model: Any, dtype: str = "float16") -> dict[str, Any]:
    """What decides a cached feature besides the image bytes: the tower's weights, architecture,
    preprocessing, the layer/tokens it is read at, and the stored dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"feature cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tower = model.tower
    cfg = _plain(getattr(tower, "config", {}))
    cfg.pop("path", None)  # where the weights came from does not matter, their hash does
    hf = getattr(getattr(tower, "model", None), "config", None)
    hf_cfg = _plain(hf) if hf is not None else {}
    hf_cfg.pop("_name_or_path", None)
    processor = getattr(tower, "processor", None)
    return {
        "version": CACHE_VERSION,
        "tower weights": model_fingerprint(tower),
        "tower class": type(tower).__name__,
        "tower config": hf_cfg,
        "preprocessing": {
            "processor": _plain(processor) if processor is not None else None,
            "pad_to_square": cfg.get("pad_to_square"),
        },
        "select_layer": cfg.get("select_layer"),
        "select_feature": cfg.get("select_feature"),
        "dtype": dtype,
    }


def _read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    """The cache's manifest (its meta file: kind `feature_cache`, format_version), checked; None if absent."""
    path = cache_dir / MANIFEST_FILE
    return read_meta(path, CACHE_KIND, CACHE_VERSION) if path.is_file() else None


def check_fingerprint(cache_dir: Path, manifest: dict[str, Any], fp: dict[str, Any]) -> None:
    """Raise StaleCacheError naming every part of the fingerprint that differs from the cache's."""
    old = manifest.get("fingerprint", {})
    changed = []
    for key in fp:
        if old.get(key) == fp[key]:
            continue
        if key in ("tower weights", "tower config", "preprocessing"):
            changed.append(f"{key} changed")
        else:
            changed.append(f"{key} changed (cache {old.get(key)!r}, now {fp[key]!r})")
    if changed:
        raise StaleCacheError(
            f"stale feature cache {cache_dir}: {'; '.join(changed)}. Delete it or point "
            "data.feature_cache_dir elsewhere; it is never reused for another tower"
        )


def _write_manifest(
    cache_dir: Path, fp: dict[str, Any], index: dict[str, str], shape: list[int] | None
) -> None:
    manifest = {
        "fingerprint": fp,
        "digest": digest(fp),
        "images": len(index),
        "feature_shape": shape,
        "index": index,
    }
    tmp = cache_dir / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    write_meta(tmp, CACHE_KIND, CACHE_VERSION, manifest, indent=None)  # the index can be large
    os.replace(tmp, cache_dir / MANIFEST_FILE)


def default_cache_dir(data_json: str | Path, fp: dict[str, Any]) -> Path:
    return Path(data_json).parent / "feature_cache" / digest(fp)[:16]


@torch.no_grad()
def build_cache(
    model: Any,
    images: list[Path],
    cache_dir: str | Path,
    dtype: str = "float16",
    batch_size: int = 32,
    shard_images: int = 2048,
    fp: dict[str, Any] | None = None,
    skip_bad: bool = False,
    log=print,
) -> FeatureCache:
    """Compute the features of every image in `images` missing from the cache at `cache_dir`.

    The tower runs in eval mode on its current device and dtype; results are stored in `dtype`, and
    a value that overflows it (float16 past 65504) is an error naming the image, not an inf.
    """
    cache_dir = Path(cache_dir)
    fp = fp if fp is not None else tower_fingerprint(model, dtype)
    manifest = _read_manifest(cache_dir)
    index: dict[str, str] = {}
    shape = None
    if manifest is not None:
        check_fingerprint(cache_dir, manifest, fp)
        index, shape = dict(manifest["index"]), manifest.get("feature_shape")
    todo: dict[str, Path] = {}
    for p in images:
        key = file_hash(p)
        if key not in index and key not in todo:
            todo[key] = Path(p)
    if not todo:
        return FeatureCache(cache_dir, fp)
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"[feature_cache] {len(todo)} image(s) to encode ({len(index)} cached) -> {cache_dir}")
    tower = model.tower
    was_training = tower.training
    tower.eval()
    keys = list(todo)
    shard_no = len({v for v in index.values()})
    try:
        for s in range(0, len(keys), shard_images):
            shard: dict[str, torch.Tensor] = {}
            chunk = keys[s : s + shard_images]
            for b in range(0, len(chunk), batch_size):
                part, pics = [], []
                for k in chunk[b : b + batch_size]:
                    try:
                        pics.append(load_image(todo[k]))
                        part.append(k)
                    except ImageError as e:  # the sample is reported (or skipped) by the dataset at fetch
                        if not skip_bad:
                            raise ImageError(f"{todo[k]}: {e}") from e
                if not part:
                    continue
                pixels = model.preprocess(pics)  # the dataset's own preprocessing, exactly
                feats = model.tower_features(pixels).float().cpu()
                stored = feats.to(DTYPES[dtype])
                for k, f, g in zip(part, feats, stored):
                    if not torch.isfinite(g).all():
                        raise ValueError(
                            f"{todo[k]}: tower features (max |x| {float(f.abs().max()):.3g}) "
                            f"overflow {dtype}; use data.feature_dtype=bfloat16"
                        )
                    shard[k] = g.contiguous()
                shape = list(stored.shape[1:])
            if not shard:
                continue
            name = f"shard-{shard_no:05d}.safetensors"
            tmp = cache_dir / f".{name}.{os.getpid()}.tmp"
            save_file(shard, str(tmp))
            os.replace(tmp, cache_dir / name)
            index.update(dict.fromkeys(shard, name))
            _write_manifest(
                cache_dir, fp, index, shape
            )  # after the shard: the manifest never names a missing file
            shard_no += 1
    finally:
        tower.train(was_training)
    return FeatureCache(cache_dir, fp)


class FeatureCache:
    """Read side: image paths -> stacked cached features, for `ConversationDataset.features`.

    Picklable for DataLoader workers (open shard handles are per process). File hashes are memoised
    per process by (path, size, mtime), so an image edited mid-run is hashed again and then missed.
    """

    def __init__(self, cache_dir: str | Path, fp: dict[str, Any] | None = None):
        self.dir = Path(cache_dir)
        manifest = _read_manifest(self.dir)
        if manifest is None:
            raise FileNotFoundError(f"{self.dir}: no feature cache ({MANIFEST_FILE})")
        if fp is not None:
            check_fingerprint(self.dir, manifest, fp)
        self.fingerprint = manifest["fingerprint"]
        self.index: dict[str, str] = manifest["index"]
        self._handles: dict[str, Any] = {}
        self._hashes: dict[str, tuple[int, int, str]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def key(self, path: Path) -> str:
        st = os.stat(path)
        memo = self._hashes.get(str(path))
        if memo is not None and memo[:2] == (st.st_size, st.st_mtime_ns):
            return memo[2]
        h = file_hash(path)
        self._hashes[str(path)] = (st.st_size, st.st_mtime_ns, h)
        return h

    def get(self, path: Path, sample: str = "") -> torch.Tensor:
        try:
            key = self.key(path)
        except OSError as e:
            raise SampleError(f"{sample}: cannot read image {path}: {e}") from e
        shard = self.index.get(key)
        if shard is None:
            raise SampleError(
                f"{sample}: image {path} is not in the feature cache {self.dir} (changed since "
                "the cache was built, or the cache was built for other data)"
            )
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def __call__(self, paths: list[Path], sample: str = "") -> torch.Tensor:
        return torch.stack([self.get(p, sample) for p in paths])


def check_frozen(trainable: dict[str, float], stage_name: str) -> None:
    """Refuse the cache for a stage that trains the tower: its features change every step."""
    hot = [p for p in trainable if p == "tower" or p.startswith("tower.")]
    if hot:
        raise ValueError(
            f"stage {stage_name!r}: data.feature_cache needs a frozen tower, but the stage trains "
            f"{hot}; turn the cache off or freeze the tower"
        )


def dataset_images(ds: Any) -> list[Path]:
    """Every image file a ConversationDataset refers to (resolved under its root), bad samples skipped."""
    out: list[Path] = []
    for i, rec in enumerate(ds.records):
        if i in ds.load_errors:
            continue
        for p in image_paths(rec):
            try:
                out.append(resolve_image(ds.image_root, p))
            except ImageError:  # a bad path is reported by the dataset at fetch time, naming the sample
                if not ds.skip_bad_samples:
                    raise
    return out


def attach(ds: Any, cache: FeatureCache) -> Any:
    """Make `ds` (a ConversationDataset) return cached `image_features` instead of decoding images."""
    ds.features = cache
    return ds


def cache_for_stage(
    model: MultimodalLM, ds: ConversationDataset, stage: StageConfig, trainable: dict[str, float], log=print
) -> FeatureCache:
    """The stage's cache, built on rank 0 where images are missing (the others wait), attached to `ds`."""
    check_frozen(trainable, stage.name)
    if getattr(model, "fusion", None) is not None:
        raise ValueError(
            f"stage {stage.name!r}: data.feature_cache supports single-tower models; this model "
            "fuses several vision streams"
        )
    fp = tower_fingerprint(model, stage.data.feature_dtype)
    cache_dir = (
        Path(stage.data.feature_cache_dir) if stage.data.feature_cache_dir else default_cache_dir(ds.path, fp)
    )
    manifest = _read_manifest(cache_dir)
    if manifest is not None:
        check_fingerprint(cache_dir, manifest, fp)  # every rank refuses a stale cache by itself
    if is_main():
        model.tower.to(device())
        build_cache(
            model,
            dataset_images(ds),
            cache_dir,
            stage.data.feature_dtype,
            fp=fp,
            skip_bad=ds.skip_bad_samples,
            log=lambda m: log(f"[{stage.name}] {m}"),
        )
    barrier()
    cache = FeatureCache(cache_dir, fp)
    attach(ds, cache)
    return cache
