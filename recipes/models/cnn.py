"""A small 3-conv + 2-linear image classifier."""

from __future__ import annotations

from torch import nn

from dkm_palett.validation import check_int


class SmallCNN(nn.Module):
    """conv-relu, conv-relu-pool, conv-relu-pool, linear-relu, linear. ``input_size`` must be divisible by 4."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: tuple = (16, 32, 64),
                 hidden: int = 128, input_size: int = 8, dropout: float = 0.0):
        super().__init__()
        check_int("model.net.input_size", input_size, minimum=4)
        if input_size % 4:
            raise ValueError(f"model.net.input_size={input_size} must be divisible by 4 (two 2x2 poolings).")
        if len(channels) != 3:
            raise ValueError(f"model.net.channels={list(channels)} must list 3 channel counts.")
        c1, c2, c3 = (int(c) for c in channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * side * side, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
