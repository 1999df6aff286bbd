"""Shared helper: a LightningDataModule over in-memory image arrays with a stratified train/val split."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dkm_palett.validation import check_int, check_number


class ArrayImageDataModule(L.LightningDataModule):
    """Images ``(N, C, H, W)`` in [0, 1] and integer labels, split once (stratified, seeded) into train/val.

    Subclasses implement :meth:`load_arrays`. Inputs are standardized with the train split's mean/std.
    """

    num_classes: int = 10
    input_shape: tuple[int, ...] = ()

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0):
        super().__init__()
        check_int("data.batch_size", batch_size, minimum=1)
        check_number("data.val_fraction", val_fraction, minimum=0.0, maximum=1.0, strict_min=True)
        check_int("data.num_workers", num_workers, minimum=0)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set = self.val_set = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.model_selection import train_test_split

        x, y = self.load_arrays()
        x_tr, x_va, y_tr, y_va = train_test_split(
            x, y, test_size=self.val_fraction, random_state=self.seed, stratify=y)
        mean, std = float(x_tr.mean()), float(x_tr.std()) or 1.0
        to_t = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
        self.train_set = TensorDataset(to_t(x_tr), torch.from_numpy(y_tr.astype(np.int64)))
        self.val_set = TensorDataset(to_t(x_va), torch.from_numpy(y_va.astype(np.int64)))

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256), num_workers=self.num_workers)
