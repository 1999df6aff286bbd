"""Models for the model-scale benchmark, in plain torch: a Llama-shaped decoder and a ResNet-shaped CNN.

Random weights (std 0.02, seeded) and random inputs: the benchmark measures cost, not quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderShape:
    d: int
    layers: int
    ffn: int
    vocab: int
    heads: int
    kv_dim: int


#: Decoder presets; "1.1b" is TinyLlama's shape. "7m" is the small model coremltools can still train here,
#: "20m" the one the slow test uses.
DECODERS = {
    "7m": DecoderShape(d=256, layers=4, ffn=688, vocab=8000, heads=4, kv_dim=256),
    "20m": DecoderShape(d=512, layers=4, ffn=1376, vocab=8000, heads=8, kv_dim=512),
    "125m": DecoderShape(d=768, layers=12, ffn=2048, vocab=32000, heads=12, kv_dim=768),
    "350m": DecoderShape(d=1024, layers=24, ffn=2816, vocab=32000, heads=16, kv_dim=1024),
    "1.1b": DecoderShape(d=2048, layers=22, ffn=5632, vocab=32000, heads=32, kv_dim=256),
}


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


class Attention(nn.Module):
    """Causal self-attention with grouped-query k/v (``kv_dim`` = kv heads x head dim)."""

    def __init__(self, s: DecoderShape):
        super().__init__()
        self.heads, self.head_dim = s.heads, s.d // s.heads
        self.kv_heads = s.kv_dim // self.head_dim
        self.q = nn.Linear(s.d, s.d, bias=False)
        self.k = nn.Linear(s.d, s.kv_dim, bias=False)
        self.v = nn.Linear(s.d, s.kv_dim, bias=False)
        self.o = nn.Linear(s.d, s.d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, s: DecoderShape):
        super().__init__()
        self.gate = nn.Linear(s.d, s.ffn, bias=False)
        self.up = nn.Linear(s.d, s.ffn, bias=False)
        self.down = nn.Linear(s.ffn, s.d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, s: DecoderShape):
        super().__init__()
        self.norm1, self.attn = RMSNorm(s.d), Attention(s)
        self.norm2, self.mlp = RMSNorm(s.d), SwiGLU(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    """Token embedding, pre-norm blocks, final RMSNorm, untied head."""

    def __init__(self, s: DecoderShape):
        super().__init__()
        self.shape = s
        self.embed = nn.Embedding(s.vocab, s.d)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.d)
        self.head = nn.Linear(s.d, s.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _init_std(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
                module.weight.normal_(0.0, 0.02, generator=gen)
    return model


def decoder(name: str, seed: int = 0) -> Decoder:
    """The decoder preset ``name`` (see :data:`DECODERS`) with N(0, 0.02) weights."""
    return _init_std(Decoder(DECODERS[name]), seed)


def lm_batch(model: Decoder, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence of ``tokens`` random tokens and its next-token targets."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, model.shape.vocab, (1, tokens + 1), generator=gen)
    return seq[:, :-1], seq[:, 1:]


# --------------------------------------------------------------------------------------- CNN


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


RESNETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


def resnet(name: str, classes: int = 10, seed: int = 0) -> nn.Module:
    """ResNet-18/50-shaped CNN for 32x32 inputs (3x3 stem, no max-pool), N(0, 0.02) conv/linear weights."""
    block, counts = RESNETS[name]
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
    cin = 64
    for stage, count in enumerate(counts):
        width = 64 * 2 ** stage
        for i in range(count):
            layers.append(block(cin, width, 2 if (i == 0 and stage > 0) else 1))
            cin = width * block.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return _init_std(nn.Sequential(*layers), seed)


def image_batch(batch: int = 32, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, classes, (batch,), generator=gen)


def build(name: str, tokens: int = 128, seed: int = 0):
    """``(model, inputs, targets)`` for a preset: a decoder name or a ResNet name."""
    if name in RESNETS:
        return (resnet(name, seed=seed), *image_batch(seed=seed))
    if name not in DECODERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(DECODERS) + sorted(RESNETS)}.")
    model = decoder(name, seed)
    return (model, *lm_batch(model, tokens, seed))


def loss_of(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))
