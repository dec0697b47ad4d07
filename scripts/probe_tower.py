"""Linear probe: how well a model's tower tokens tell the colour and shape of the object under each
patch (GeoWorld scene graphs give the truth). Fits a linear head on half the foreground+background
patches of 300 scenes and reports accuracy on the other half.

Usage: python scripts/probe_tower.py MODEL_DIR WORLD_DIR [scenes.jsonl relative to WORLD_DIR]
"""

from __future__ import annotations

import sys

import torch

from encoders.supervised import PatchTargets
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.data.scene_labels import SceneLabelDataset, collate_scene_labels
from mllm.model import MultimodalLM


def main() -> None:
    model_dir, world = sys.argv[1], sys.argv[2]
    scenes = sys.argv[3] if len(sys.argv) > 3 else "eval/scenes.jsonl"
    torch.manual_seed(0)
    m = MultimodalLM.from_pretrained(model_dir)
    targets = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES)
    ds = SceneLabelDataset(f"{world}/{scenes}", world, targets, m.tower.grid, m.tower.preprocess)
    b = collate_scene_labels([ds[i] for i in range(min(300, len(ds)))])
    with torch.no_grad():
        tokens = m.tower(b["pixel_values"]).tokens
    for name in ("colour", "shape"):
        x, y = tokens.reshape(-1, tokens.shape[-1]), b["labels"][name].reshape(-1)
        keep = y >= 0
        x, y = x[keep], y[keep]
        n = x.shape[0] // 2
        head = torch.nn.Linear(x.shape[1], len(targets.colours if name == "colour" else targets.shapes) + 1)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(head(x[:n]), y[:n])
            opt.zero_grad()
            loss.backward()
            opt.step()
        pred = head(x[n:]).argmax(-1)
        fg = y[n:] > 0
        print(
            f"{name}: all patches {(pred == y[n:]).float().mean():.3f}, "
            f"foreground patches {(pred[fg] == y[n:][fg]).float().mean():.3f}"
        )


if __name__ == "__main__":
    main()
