"""Reference models, built as *flat* ``nn.Sequential`` containers.

Every layer (including BatchNorm, ReLU, pooling and reshapes) is its own direct child,
so a model can be split into pipeline stages at any child boundary.

* :func:`paper_mlp` — the MLP of the DNI paper (Jaderberg et al. 2017, MNIST experiments):
  hidden layers of Linear -> BatchNorm -> ReLU and a linear classifier.
* :func:`paper_cnn` — the paper's small CNN (conv -> BN -> ReLU -> max-pool blocks and
  a linear classifier), adapted to 1-D signals such as MNIST-1D (B, 40).
* :func:`deep_mlp` — a deep, wide Linear+ReLU stack for throughput benchmarks.
* :func:`wide_mlp` — the convergence workload: a wide, deep BN-MLP for MNIST-1D
  (40 -> 1024 x 7 -> 10), heavy enough that splitting it pays off.
* :func:`char_gpt` — a small causal transformer (GPT) for character-level language
  modelling, as a flat Sequential of blocks: (B, T) int64 tokens -> (B, T, V) logits.
  :func:`lm_loss` is its token cross-entropy.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["paper_mlp", "paper_cnn", "deep_mlp", "wide_mlp", "char_gpt", "lm_loss",
           "TokenEmbedding", "TransformerBlock", "LMHead"]


def paper_mlp(in_features: int = 40, num_classes: int = 10, hidden: int = 256,
              depth: int = 3) -> nn.Sequential:
    """The DNI paper's MLP: ``depth`` x (Linear -> BatchNorm1d -> ReLU), then Linear.

    Shapes: input (B, in_features) -> every hidden activation (B, hidden) -> logits
    (B, num_classes). Children: ``3 * depth + 1`` modules (each Linear, BatchNorm1d
    and ReLU separately, then the output Linear).
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _pooled_length(length: int, kernel: int = 3, stride: int = 2, padding: int = 1) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def paper_cnn(in_channels: int = 1, num_classes: int = 10, length: int = 40,
              channels: int = 64, kernel_size: int = 5, blocks: int = 2) -> nn.Sequential:
    """The DNI paper's small CNN, in 1-D for MNIST-1D-like signals.

    Layout (a flat Sequential)::

        Unflatten            (B, in_channels * length) -> (B, in_channels, length)
        blocks x [Conv1d(k=kernel_size, 'same' padding) -> BatchNorm1d -> ReLU
                  -> MaxPool1d(3, stride 2, padding 1)]
                             (B, C, L) -> (B, channels, ceil(L / 2))
        Flatten              -> (B, channels * L_out)
        Linear               -> (B, num_classes)

    With the defaults (in_channels=1, length=40, channels=64, blocks=2) the activations
    are (B, 1, 40) -> (B, 64, 20) -> (B, 64, 10) -> (B, 640) -> (B, 10). The input is
    the flat (B, in_channels * length) tensor, i.e. (B, 40) for MNIST-1D.
    """
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (shape-preserving padding), got {kernel_size}")
    layers: list[nn.Module] = [nn.Unflatten(1, (in_channels, length))]
    width, size = in_channels, length
    for _ in range(blocks):
        layers += [nn.Conv1d(width, channels, kernel_size, padding=kernel_size // 2),
                   nn.BatchNorm1d(channels), nn.ReLU(),
                   nn.MaxPool1d(3, stride=2, padding=1)]
        width, size = channels, _pooled_length(size)
    layers += [nn.Flatten(), nn.Linear(width * size, num_classes)]
    return nn.Sequential(*layers)


def deep_mlp(in_features: int = 1024, hidden: int = 1024, depth: int = 8,
             num_classes: int = 10) -> nn.Sequential:
    """A deep Linear+ReLU stack for speed benchmarks (no normalisation layers).

    Shapes: (B, in_features) -> ``depth`` x (Linear -> ReLU) giving (B, hidden) ->
    Linear -> (B, num_classes). Children: ``2 * depth + 1`` modules, so the compute is
    easy to balance across stages (every hidden block costs the same).
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def wide_mlp(in_features: int = 40, num_classes: int = 10, hidden: int = 1024, depth: int = 7) -> nn.Sequential:
    """The convergence workload: :func:`paper_mlp` made wide and deep (default 40 -> 1024 x 7 -> 10).

    Shapes: (B, in_features) -> ``depth`` x (Linear -> BatchNorm1d -> ReLU), each (B, hidden)
    -> Linear -> (B, num_classes). Children: ``3 * depth + 1``, so it splits at any layer.
    The first block (``in_features`` -> ``hidden``) is small; the other ``depth - 1`` cost
    the same, so a pipeline balances when its stage count divides ``depth - 1``. The
    default 7 gives 6 equal blocks, which split evenly into 2, 3 or 6 stages (with 6 the
    2-stage split is 2 blocks against 3, and no 2-stage pipeline could pass 1.67x one
    device). Trained on MNIST-1D with
    20,000 generated samples (``mnist1d(num_samples=20000)``) it goes well past the paper
    MLP's accuracy on the default 5,000.

    Raises:
        ValueError: ``depth`` < 1 (the workload needs hidden layers to split between).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return paper_mlp(in_features=in_features, num_classes=num_classes, hidden=hidden, depth=depth)


class TokenEmbedding(nn.Module):
    """Token plus learned position embeddings: (B, T) int64 -> (B, T, dim) float.

    Raises:
        ValueError: the sequence is longer than ``max_len`` (no position embedding for it).
    """

    def __init__(self, vocab_size: int, dim: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"the token embedding takes (B, T) token ids, got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.max_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's max_len {self.max_len}")
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.tokens(idx) + self.positions(pos)[None]


class TransformerBlock(nn.Module):
    """A pre-norm causal transformer block: (B, T, dim) -> (B, T, dim).

    ``x + Attn(LN(x))`` (causal multi-head self-attention), then ``x + MLP(LN(x))`` with a
    4x GELU MLP. The output projections start at std ``0.02 / sqrt(2 * n_layers)``
    (GPT-2's residual scaling), so the residual stream's scale does not grow with depth.
    """

    def __init__(self, dim: int, heads: int, n_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)
        for layer in (self.qkv, self.fc):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        for layer in (self.proj, self.out):
            nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * n_layers))
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class LMHead(nn.Module):
    """Final LayerNorm and an untied linear map to the vocabulary: (B, T, dim) -> (B, T, vocab)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(x))


def char_gpt(vocab_size: int = 256, dim: int = 128, n_layers: int = 4, heads: int = 4,
             max_len: int = 128, dropout: float = 0.0) -> nn.Sequential:
    """A small GPT for character-level language modelling, as a flat Sequential of blocks.

    Children: :class:`TokenEmbedding` ((B, T) int64 -> (B, T, dim)), ``n_layers`` x
    :class:`TransformerBlock` ((B, T, dim) -> (B, T, dim)), :class:`LMHead`
    (-> (B, T, vocab_size) logits); ``n_layers + 2`` in all, so it splits between any two
    blocks and every boundary is a (B, T, dim) activation. Causal attention, learned
    positions (T <= ``max_len``), untied output head. Train with :func:`lm_loss` on
    ``synthpipe.text.char_lm(seq_len=T)`` (bytes, so ``vocab_size`` 256).

    Raises:
        ValueError: ``n_layers`` < 1, or ``dim`` not divisible by ``heads``.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if dim % heads:
        raise ValueError(f"width {dim} is not divisible by {heads} heads")
    return nn.Sequential(TokenEmbedding(vocab_size, dim, max_len),
                         *[TransformerBlock(dim, heads, n_layers, dropout) for _ in range(n_layers)],
                         LMHead(dim, vocab_size))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy: logits (B, T, V), targets (B, T) int64 -> scalar (nats per token).

    Raises:
        ValueError: ``logits`` is not (B, T, V) or ``targets`` is not the matching (B, T).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"lm_loss takes logits (B, T, V) and targets (B, T), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
