"""Character-level language-model data: the CPython documentation text in ``pydoc_data.topics`` (stdlib)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dkm_palett.validation import check_int, check_number

#: Fixed alphabet (newline + printable ASCII); id 0 is "unknown". Fixed so the vocabulary never depends on the
#: Python version that ships the text.
ALPHABET = "\n" + "".join(chr(i) for i in range(32, 127))
VOCAB_SIZE = len(ALPHABET) + 1
_STOI = {ch: i + 1 for i, ch in enumerate(ALPHABET)}


def load_text() -> str:
    """All help topics of the running CPython, in a stable (sorted) order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def encode(text: str) -> torch.Tensor:
    return torch.tensor([_STOI.get(ch, 0) for ch in text], dtype=torch.int64)


def decode(ids) -> str:
    return "".join(ALPHABET[i - 1] if 0 < i <= len(ALPHABET) else "?" for i in ids)


def split_ids(ids: torch.Tensor, val_fraction: float = 0.1, val_chars: int | None = 16384):
    """The recipe's split: the first ``1 - val_fraction`` of the ids to train on, at most ``val_chars`` of the rest
    to validate on."""
    split = int(len(ids) * (1 - val_fraction))
    return ids[:split], (ids[split:] if val_chars is None else ids[split:split + val_chars])


def window_batch(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``_Windows(ids, seq_len)`` stacked: inputs and next-character targets, each ``(count, seq_len)``."""
    offsets = torch.arange((len(ids) - 1) // seq_len)[:, None] * seq_len + torch.arange(seq_len)
    return ids[offsets], ids[offsets + 1]


class _Windows(Dataset):
    """Non-overlapping windows: input ``ids[s:s+L]``, target ``ids[s+1:s+L+1]``."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        self.ids, self.seq_len = ids, seq_len
        self.count = max(0, (len(ids) - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        s = i * self.seq_len
        return self.ids[s:s + self.seq_len], self.ids[s + 1:s + self.seq_len + 1]


class CharLMDataModule(L.LightningDataModule):
    """Train on the first ``1 - val_fraction`` of the text, validate on (at most ``val_chars`` of) the rest."""

    vocab_size = VOCAB_SIZE

    def __init__(self, seq_len: int = 64, batch_size: int = 32, val_fraction: float = 0.1,
                 val_chars: int | None = 16384, seed: int = 0, num_workers: int = 0):
        super().__init__()
        check_int("data.seq_len", seq_len, minimum=2)
        check_int("data.batch_size", batch_size, minimum=1)
        check_number("data.val_fraction", val_fraction, minimum=0.0, maximum=1.0, strict_min=True)
        if val_chars is not None:
            check_int("data.val_chars", val_chars, minimum=seq_len + 1)
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.val_chars, self.seed, self.num_workers = val_chars, seed, num_workers
        self.input_shape = (seq_len,)
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = split_ids(encode(load_text()), self.val_fraction, self.val_chars)
        self.train_set = _Windows(train, self.seq_len)
        self.val_set = _Windows(val, self.seq_len)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 64), num_workers=self.num_workers)
