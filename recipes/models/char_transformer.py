"""A small causal character-level transformer (Embedding + nn.TransformerEncoder + Linear head)."""

from __future__ import annotations

import torch
from torch import nn

from dkm_palett.validation import check_int


class CharTransformer(nn.Module):
    """Token + learned position embeddings, pre-norm ``nn.TransformerEncoder`` with a causal mask, linear head.

    Its ``nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj``), ``nn.Linear`` and ``nn.Embedding`` weights are
    all palettizable.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 128, max_len: int = 64, dropout: float = 0.0):
        super().__init__()
        check_int("model.net.vocab_size", vocab_size, minimum=2)
        check_int("model.net.max_len", max_len, minimum=1)
        if d_model % nhead:
            raise ValueError(f"model.net.nhead={nhead} must divide model.net.d_model={d_model}.")
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        # SiLU (not ReLU/GELU) and the float mask keep PyTorch's fused inference kernel
        # (``_transformer_encoder_layer_fwd``) out of eval/traced graphs, so every weight stays a plain op for export.
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation=nn.SiLU(),
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        # A float (additive) causal mask.
        mask = torch.triu(torch.full((max_len, max_len), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.tok(ids) + self.pos.weight[:length].unsqueeze(0)
        x = self.encoder(x, mask=self.causal_mask[:length, :length], is_causal=True)
        return self.head(self.norm(x))
