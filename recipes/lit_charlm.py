"""LightningModule for next-character prediction; validation loss and perplexity via torchmetrics."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.text import Perplexity

from dkm_palett.validation import check_int, check_number


class LitCharLM(L.LightningModule):
    """Cross-entropy over every position of ``net(ids) -> (B, T, V)`` logits; logs ``val_loss``/``val_perplexity``."""

    def __init__(self, net: nn.Module, seq_len: int = 64, lr: float = 3e-3, weight_decay: float = 0.01):
        super().__init__()
        check_int("model.seq_len", seq_len, minimum=1)
        check_number("model.lr", lr, minimum=0.0, strict_min=True)
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.lr, self.weight_decay = lr, weight_decay
        self.example_input_array = torch.zeros(1, seq_len, dtype=torch.int64)
        self.val_perplexity = Perplexity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    def training_step(self, batch, batch_idx):
        ids, target = batch
        loss = self._loss(self(ids), target)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        ids, target = batch
        logits = self(ids)
        self.val_perplexity(logits.float(), target)
        self.log("val_loss", self._loss(logits, target), prog_bar=True)
        self.log("val_perplexity", self.val_perplexity, prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
