"""A generic LightningModule for classification: any ``net`` + Adam(W) + torchmetrics Accuracy."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dkm_palett.validation import check_choice, check_int, check_number


class LitClassifier(L.LightningModule):
    """Cross-entropy training of ``net``; logs ``train_loss``, ``val_loss`` and ``val_accuracy`` (0..1).

    ``lr`` is read when the optimizer is built, so a recipe may lower it before fine-tuning.
    """

    def __init__(self, net: nn.Module, num_classes: int, input_shape: tuple = (1, 8, 8), lr: float = 1e-3,
                 weight_decay: float = 0.0, optimizer: str = "adam"):
        super().__init__()
        check_int("model.num_classes", num_classes, minimum=2)
        check_number("model.lr", lr, minimum=0.0, strict_min=True)
        check_choice("model.optimizer", optimizer, ("adam", "adamw", "sgd"))
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.example_input_array = torch.zeros(1, *input_shape)
        self.train_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_accuracy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_accuracy", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_accuracy(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_accuracy", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)
