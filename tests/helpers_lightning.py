"""A tiny real LightningModule + DataModule on sklearn's digits (8x8 images, 10 classes), for tests.

Deterministic by default: a fixed split, no shuffling, ``torch.manual_seed(seed)`` before the weights are built.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: ``x`` (N, 1, 8, 8) float32 in [0, 1] and ``y`` (N,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return x, y


class DigitsDataModule(L.LightningDataModule):
    """Train on the first ``n_train`` digits, validate/test/predict on the next ``n_val``; fixed order."""

    def __init__(self, batch_size: int = 64, n_train: int = 512, n_val: int = 256, shuffle: bool = False):
        super().__init__()
        self.batch_size, self.n_train, self.n_val, self.shuffle = batch_size, n_train, n_val, shuffle
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            x, y = digits_tensors()
            self.train_set = TensorDataset(x[: self.n_train], y[: self.n_train])
            end = self.n_train + self.n_val
            self.val_set = TensorDataset(x[self.n_train:end], y[self.n_train:end])

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0) if self.shuffle else None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, generator=gen)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    test_dataloader = val_dataloader

    def predict_dataloader(self):
        return DataLoader(TensorDataset(self.val_set.tensors[0]), batch_size=self.batch_size)


def make_net(arch: str = "mlp", hidden: int = 64) -> nn.Module:
    """``mlp``: Flatten, Linear(64, hidden), ReLU, Linear(hidden, 10). ``cnn``: Conv(1->8, 3x3), ReLU, pool, Linear."""
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    if arch == "cnn":
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(16 * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    raise ValueError(f"arch={arch!r} is not allowed; allowed values: 'mlp', 'cnn'.")


class DigitsClassifier(L.LightningModule):
    """Cross-entropy + Adam on ``make_net(arch, hidden)``; logs train_loss, val_loss, val_acc, test_acc."""

    def __init__(self, arch: str = "mlp", hidden: int = 64, lr: float = 1e-2, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = make_net(arch, hidden)
        self.lr = lr
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _evaluate(self, batch, prefix: str):
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y))
        self.log(f"{prefix}_acc", (logits.argmax(-1) == y).float().mean())

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def quiet_trainer_kwargs(**overrides) -> dict:
    """Trainer kwargs for fast, silent CPU test runs (no progress bar, summary or default checkpointing)."""
    kwargs = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, logger=False, num_sanity_val_steps=0, deterministic=True)
    kwargs.update(overrides)
    return kwargs
