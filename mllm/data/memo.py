"""A dataset that keeps each sample once made, for stages that see the same samples every epoch.

Why: the tower warm-up draws, labels and preprocesses each GeoWorld row the same way every time (one
fixed drawing per row), and doing it again was half of a warm-up step on two CPU cores
(bench/loader_memo.py). Only for datasets whose item `i` is a pure function of `i`: one that draws
anew per fetch (random captions, masks, augmentations) would be frozen by it.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class MemoDataset(Dataset):
    """`dataset[i]`, made on first use and returned as it is afterwards (callers must not change it
    in place: the collators build new tensors). Each DataLoader worker keeps its own memo."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.memo: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        if i not in self.memo:
            self.memo[i] = self.dataset[i]
        return self.memo[i]

    def __getattr__(self, name: str) -> Any:
        # what the stage reads off its dataset (rows, path, ...) is the wrapped one's
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
