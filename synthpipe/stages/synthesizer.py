"""Synthetic-gradient models ("synthesizers", M_r in docs/guide.md, section 1).

A synthesizer predicts the gradient of the loss with respect to a stage's output,
``g_r ~ dL/dh_r``, from the output itself and, for cDNI, the labels.

Normalisation (one rule everywhere): when the loss is a batch mean, ``dL/dh`` scales
like ``1/B``. Synthesizers therefore regress the *per-example* gradient
``B * dL/dh`` (B = ``h.shape[0]``) and the stage divides the prediction by ``B`` when
it applies it. :func:`per_example` and :func:`per_batch` implement the two directions.

:class:`Synthesizer` is a recipe; :meth:`Synthesizer.build` makes one
:class:`BoundarySynthesizer` per stage boundary from the first activation seen there.
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Tensors", "KINDS", "per_example", "per_batch", "one_hot_labels", "LinearSynth", "LowRankSynth", "MLPSynth",
           "ConvSynth", "TokenSynth", "CRITIC_SEED", "LINEAR_WARN_PARAMS", "LINEAR_MAX_PARAMS", "BoundarySynthesizer",
           "Synthesizer"]

Tensors = tuple  # tuple[Tensor | None, ...]; kept loose for the optional entries

KINDS = ("auto", "linear", "lowrank", "mlp", "conv", "token")
DEFAULT_NORMALIZE = True  # measured: better cDNI per step on every MLP workload tried
DEFAULT_BOUND: float | None = None
DEFAULT_MIN_QUALITY: float | None = None
DEFAULT_CLASSIFIER = True  # measured: cDNI per step, paper MLP 4 stages -5.0 -> -3.4 points, wide MLP 3: -8.1 -> -6.6
CRITIC_SEED = 0  # the critic term's fixed start (LinearSynth(critic=...))
DEFAULT_REPLAY = 2  # measured: cDNI per step, paper MLP -3.8 -> -1.4 points at 2 stages, wide MLP at 3 -13.8 -> -7.7


def per_example(grad: torch.Tensor) -> torch.Tensor:
    """Batch-mean gradient -> per-example regression target (times the batch size)."""
    return grad * grad.shape[0]


def per_batch(pred: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-example prediction -> gradient of the batch-mean loss (divided by batch size),
    times ``scale`` (in the same pass)."""
    return pred * (scale / pred.shape[0])


def one_hot_labels(y: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """One-hot labels as float of ``like``'s dtype and device; (B,) -> (B, C), (B, T) -> (B, T, C)."""
    if y.dtype.is_floating_point:
        raise TypeError(f"conditional synthesizer needs integer class labels, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for a conditional synthesizer, "
            f"got min {int(y.min())} and max {int(y.max())}")
    return F.one_hot(y.long().to(like.device), num_classes).to(like.dtype)


def _one_value_per_channel(x: torch.Tensor) -> bool:
    """True where training-mode BatchNorm cannot compute batch statistics (one value per channel)."""
    return x.numel() == x.shape[1]


class _BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm that falls back to running statistics for one value per channel.

    A last batch of size 1 must not crash a stage (training-mode BatchNorm needs more
    than one value per channel); the running statistics are the best estimate then.
    Takes (B, C) and (B, C, L).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _one_value_per_channel(x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class _BatchNorm2d(nn.BatchNorm2d):
    """2-D version of :class:`_BatchNorm1d` (one value per channel: batch 1 and a 1x1 map)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _one_value_per_channel(x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class _BatchNorm3d(nn.BatchNorm3d):
    """3-D version of :class:`_BatchNorm1d` (batch 1 and a 1x1x1 volume)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _one_value_per_channel(x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def _zero_(layer: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias so the first synthetic gradients are exactly zero."""
    weight, bias = layer.weight, getattr(layer, "bias", None)
    assert isinstance(weight, torch.Tensor)
    nn.init.zeros_(weight)
    if isinstance(bias, torch.Tensor):
        nn.init.zeros_(bias)
    return layer


class _Conditioned(nn.Module):
    """Base: holds whether labels are concatenated to the input and how many classes."""

    def __init__(self, num_classes: int | None):
        super().__init__()
        self.num_classes = num_classes

    @property
    def label_dim(self) -> int:
        return self.num_classes or 0

    per_token_labels = False  # only the token synthesizer takes (B, T) labels

    def _labels(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if y is None:
            raise ValueError("a conditional synthesizer needs the labels, but none were given")
        if y.dim() != 1 and not (self.per_token_labels and y.dim() == 2):
            raise ValueError(
                f"{type(self).__name__} takes one label per example, shape (B,), got labels of shape "
                f"{tuple(y.shape)}; per-token labels (B, T) need the 'token' synthesizer")
        if y.shape[0] != like.shape[0]:
            raise ValueError(f"labels have batch size {y.shape[0]} but the activation has {like.shape[0]}")
        return one_hot_labels(y, self.num_classes, like)


class LinearSynth(_Conditioned):
    """(B, *S) -> (B, *S): one linear map of the flattened activation (+ one-hot labels).

    Conditional, with ``classifier`` (the default), the prediction also has the form of
    a softmax classifier's input gradient: ``A [z; y] + b + W (softmax(V z + c) - y)``,
    for the flattened activation ``z`` and one-hot labels ``y``, with ``A``, ``b``,
    ``V``, ``c`` and ``W`` all fitted by the regression on the targets. All start at
    zero, so the first predictions are zero and building it draws no random numbers
    (runs in one process and on several ranks start alike). The true gradient at any
    boundary of a classifier ends in the factor ``p - y`` (the network's probabilities
    minus the labels), which a map linear in ``z`` cannot follow: it vanishes on the
    examples the network already classifies right. The term costs ``2 * C`` weights
    per feature for ``C`` classes.

    ``critic=k`` (off by default: 0) adds the input gradient of a one-hidden-layer ReLU
    classifier of ``z``, ``K (1[U z + a > 0] * ((softmax(Q relu(U z + a) + q) - y) Q))``,
    the shape a true gradient has behind later ReLU layers (which inputs pass depends on
    ``z``). ``U``, ``a``, ``Q`` and ``q`` (``k`` units) start random from a fixed seed
    (:data:`CRITIC_SEED`, the global random state untouched), ``K`` at zero; all are
    fitted by the regression. It costs ``2 * k`` weights per feature, plus ``k * (C + 1)``.

    Raises:
        ValueError: ``critic`` without labels (an unconditional synthesizer).
    """

    def __init__(self, shape: Sequence[int], num_classes: int | None = None,
                 classifier: bool = DEFAULT_CLASSIFIER, critic: int = 0):
        super().__init__(num_classes)
        self.shape = tuple(shape)
        features = int(torch.Size(self.shape).numel())
        self.out = _zero_(nn.Linear(features + self.label_dim, features))
        self.read: nn.Module | None = None
        self.back: nn.Module | None = None
        if classifier and num_classes:
            self.read = _zero_(nn.Linear(features, num_classes))
            self.back = _zero_(nn.Linear(num_classes, features, bias=False))
        self.critic_in: nn.Linear | None = None
        self.critic_head: nn.Linear | None = None
        self.critic_back: nn.Linear | None = None
        if critic:
            if not num_classes:
                raise ValueError("the critic term needs labels: conditional=True and num_classes")
            # A random start (the critic's units must differ), but a fixed one: the same in
            # every process whatever the global random state, which is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(CRITIC_SEED)
                self.critic_in = nn.Linear(features, critic)
                self.critic_head = nn.Linear(critic, num_classes)
                self.critic_back = nn.Linear(critic, features, bias=False)
            _zero_(self.critic_back)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z = h.flatten(1)
        labels = self._labels(y, h)
        if labels is None:
            return self.out(z).view_as(h)
        out = self.out(torch.cat([z, labels], dim=1))
        if self.read is not None and self.back is not None:
            out = out + self.back(torch.softmax(self.read(z), dim=1) - labels)
        if self.critic_in is not None and self.critic_head is not None and self.critic_back is not None:
            # The input gradient of the critic's cross-entropy, in its own units (back-mapped
            # by a fitted K instead of U^T): (1[u > 0] * ((p - y) Q)) with u = U z + a.
            units = self.critic_in(z)
            p = torch.softmax(self.critic_head(torch.relu(units)), dim=1)
            out = out + self.critic_back(((p - labels) @ self.critic_head.weight) * (units > 0).to(z.dtype))
        return out.view_as(h)


class LowRankSynth(_Conditioned):
    """(B, *S) -> (B, *S) through a rank-``rank`` bottleneck; cheap on wide layers."""

    def __init__(self, shape: Sequence[int], num_classes: int | None = None, rank: int = 32):
        super().__init__(num_classes)
        features = int(torch.Size(tuple(shape)).numel())
        self.down = nn.Linear(features + self.label_dim, rank, bias=False)
        self.up = _zero_(nn.Linear(rank, features))

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z = h.flatten(1)
        labels = self._labels(y, h)
        if labels is None:
            return self.up(self.down(z)).view_as(h)
        # down([z, labels]) without materialising the concatenation (a full copy of the
        # activation): the label columns of the weight enter as the additive term.
        weight = self.down.weight
        features = z.shape[1]
        code = torch.addmm(F.linear(labels.reshape(len(h), -1), weight[:, features:]), z, weight[:, :features].t())
        return self.up(code).view_as(h)


class MLPSynth(_Conditioned):
    """(B, *S) -> (B, *S): ``depth`` hidden layers of ``hidden`` units with BN+ReLU."""

    def __init__(self, shape: Sequence[int], num_classes: int | None = None,
                 hidden: int = 1024, depth: int = 2):
        super().__init__(num_classes)
        features = int(torch.Size(tuple(shape)).numel())
        layers: list[nn.Module] = []
        width = features + self.label_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), _BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.out = _zero_(nn.Linear(width, features))

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z = h.flatten(1)
        labels = self._labels(y, h)
        if labels is not None:
            z = torch.cat([z, labels.reshape(len(h), -1)], dim=1)
        return self.out(self.hidden(z)).view_as(h)


# Per spatial rank: the convolution and batch norm of the conv synthesizer.
_CONV_LAYERS: dict[int, tuple[type[nn.Module], type[nn.Module]]] = {
    1: (nn.Conv1d, _BatchNorm1d), 2: (nn.Conv2d, _BatchNorm2d), 3: (nn.Conv3d, _BatchNorm3d)}


class ConvSynth(_Conditioned):
    """(B, C, *S) -> (B, C, *S): shape-preserving convolutions with BN+ReLU.

    ``S`` has 1, 2 or 3 spatial dimensions: (B, C, L) from a ``Conv1d`` stage, (B, C, H, W),
    (B, C, D, H, W); the layers are ``Conv1d``/``Conv2d``/``Conv3d`` to match.
    Labels are one-hot and broadcast over space as extra input channels.

    Raises:
        ValueError: activations without a channel and 1 to 3 spatial dimensions.
    """

    def __init__(self, shape: Sequence[int], num_classes: int | None = None,
                 hidden: int = 64, depth: int = 2, kernel_size: int = 5):
        super().__init__(num_classes)
        spatial = len(shape) - 1
        if spatial not in _CONV_LAYERS:
            raise ValueError(f"the conv synthesizer needs (B, C, L), (B, C, H, W) or (B, C, D, H, W) activations, "
                             f"got a per-example shape {tuple(shape)}; 'mlp', 'lowrank' or 'linear' take any shape")
        conv, norm = _CONV_LAYERS[spatial]
        channels = shape[0]
        pad = kernel_size // 2
        layers: list[nn.Module] = []
        width = channels + self.label_dim
        for _ in range(depth):
            layers += [conv(width, hidden, kernel_size, padding=pad), norm(hidden), nn.ReLU()]
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.out = _zero_(conv(width, channels, kernel_size, padding=pad))

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z = h
        labels = self._labels(y, h)
        if labels is not None:
            spatial = h.shape[2:]
            planes = labels.reshape(len(h), -1, *(1,) * len(spatial)).expand(-1, -1, *spatial)
            z = torch.cat([z, planes], dim=1)
        return self.out(self.hidden(z))


class TokenSynth(_Conditioned):
    """(B, T, D) -> (B, T, D): the same MLP at every position (T may change per step).

    Labels may be per sequence, (B,), broadcast over T, or per token, (B, T).

    Conditional, with ``classifier`` (the default), the prediction also has the form of
    the input gradient of a softmax head read through a LayerNorm, as a transformer's own
    LM head reads its residual stream: ``P(x) W (softmax(V x + c) - y)`` at every
    position, for the layer-normalised activation ``x`` (over D) and one-hot labels
    ``y``, where ``P(x) v = v - mean(v) - x * mean(v * x)`` is what the LayerNorm lets
    through. ``V``, ``c`` and ``W`` start at zero and are fitted by the regression. It
    costs ``2 * C`` weights per feature. (Through :class:`BoundarySynthesizer` with
    ``normalize``, the whole prediction is then divided by the activation's own scale,
    the rest of that LayerNorm's input gradient.)
    """

    per_token_labels = True

    def __init__(self, shape: Sequence[int], num_classes: int | None = None,
                 hidden: int = 256, depth: int = 1, classifier: bool = DEFAULT_CLASSIFIER):
        super().__init__(num_classes)
        if len(shape) != 2:
            raise ValueError(f"the token synthesizer needs 3-D (B, T, D) activations, got a per-example shape "
                             f"{tuple(shape)}")
        dim = shape[-1]
        layers: list[nn.Module] = []
        width = dim + self.label_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.out = _zero_(nn.Linear(width, dim))
        self.read: nn.Module | None = None
        self.back: nn.Module | None = None
        if classifier and num_classes:
            self.read = _zero_(nn.Linear(dim, num_classes))
            self.back = _zero_(nn.Linear(num_classes, dim, bias=False))

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        labels = self._labels(y, h)
        if labels is None:
            return self.out(self.hidden(h))
        if labels.dim() == 2:  # per sequence: broadcast over positions
            labels = labels[:, None, :].expand(-1, h.shape[1], -1)
        out = self.out(self.hidden(torch.cat([h, labels], dim=-1)))
        if self.read is not None and self.back is not None:
            x = F.layer_norm(h, h.shape[-1:])  # (h itself where the boundary normalises it already)
            v = self.back(torch.softmax(self.read(x), dim=-1) - labels)
            out = out + v - v.mean(-1, keepdim=True) - x * (v * x).mean(-1, keepdim=True)
        return out


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearSynth, "lowrank": LowRankSynth, "mlp": MLPSynth,
    "conv": ConvSynth, "token": TokenSynth,
}


def example_device(example: Sequence[Any]) -> torch.device:
    """The device of the first tensor of a boundary (CPU if it has none)."""
    return next((t.device for t in example if torch.is_tensor(t)), torch.device("cpu"))


LINEAR_WARN_PARAMS = 2 ** 26  # 256 MiB in float32, before the optimizer's state
LINEAR_MAX_PARAMS = 2 ** 31  # 8 GiB: certainly a mistake (the default kind on a feature map)


def _options_of(kind: str) -> list[str]:
    return [n for n in inspect.signature(_BUILDERS[kind]).parameters if n not in ("shape", "num_classes")]


def _check_options(kind: str, options: dict[str, Any]) -> None:
    """Options no model of ``kind`` takes are an error now, not at the first step."""
    kinds = ("conv", "token", "linear") if kind == "auto" else (kind,)
    known = {n for k in kinds for n in _options_of(k)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"the {kind} synthesizer takes no option {', '.join(map(repr, unknown))}; its options are "
                         f"{sorted(known) or 'none'}")
    # The options whose default is True or False are switches; the others are sizes.
    switches = {n for k in kinds for n, p in inspect.signature(_BUILDERS[k]).parameters.items()
                if isinstance(p.default, bool)}
    for name, value in options.items():  # sizes: whole numbers (depth 0 is a plain linear map)
        if name in switches:
            if not isinstance(value, bool):
                raise ValueError(f"the {kind} synthesizer's {name} must be True or False, got {value!r}")
            continue
        least = 0 if name in ("depth", "critic") else 1  # (critic=0: no critic term)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"the {kind} synthesizer's {name} must be a whole number >= {least}, got {value!r}")


def _check_linear_size(boundary: int, shape: tuple[int, ...], num_classes: int | None) -> None:
    """A linear map of a whole feature map is features^2 parameters: warn, or refuse the absurd."""
    features = int(torch.Size(shape).numel())
    params = features * (features + (num_classes or 0)) + features
    if params <= LINEAR_WARN_PARAMS:
        return
    message = (f"boundary {boundary}: a linear synthesizer of activations of shape (B, "
               f"{', '.join(map(str, shape))}) has {params:,} parameters ({params * 4 / 2 ** 30:.1f} GiB in "
               f"float32, three times that with Adam's state); Synthesizer('lowrank', rank=...) maps the same "
               f"activations through a bottleneck, and 'auto' picks 'conv' for convolutions' feature maps and "
               f"'token' for (B, T, D)")
    if params > LINEAR_MAX_PARAMS:
        raise ValueError(message)
    warnings.warn(message, stacklevel=4)


# Layers that decide what a stage's activations are: channel-first feature maps after a
# convolution (or a norm over its channels), a (B, T, D) sequence after the others.
_CHANNEL_LAYERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.GroupNorm)
_SEQUENCE_LAYERS = (nn.Linear, nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.RMSNorm, nn.MultiheadAttention,
                    nn.RNNBase, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _channels_of(layer: nn.Module) -> int | None:
    for name in ("out_channels", "num_features", "num_channels"):
        value = getattr(layer, name, None)
        if isinstance(value, int):
            return value
    return None


def _made_by_convolution(t: torch.Tensor, module: nn.Module | None) -> bool:
    """Whether ``t`` (B, C, *S) is a convolution's feature map: the last weight or norm layer
    of ``module`` (the stage that made it, in the order its modules were registered) is a
    convolution or a norm over channels, and it has ``t.shape[1]`` channels. Activations,
    pooling and dropout in between keep the channels and are not looked at."""
    if module is None or t.dim() < 3:
        return False
    last = None
    for layer in module.modules():
        if isinstance(layer, _CHANNEL_LAYERS + _SEQUENCE_LAYERS):
            last = layer
    return isinstance(last, _CHANNEL_LAYERS) and _channels_of(last) == t.shape[1]


def _auto_kind(t: torch.Tensor, module: nn.Module | None = None) -> str:
    """``conv`` for a convolution's feature map of any rank (and 4-D activations), ``token`` for
    other (B, T, D) activations (a transformer's), ``linear`` otherwise."""
    if t.dim() in (3, 4, 5) and _made_by_convolution(t, module):
        return "conv"
    return {4: "conv", 3: "token"}.get(t.dim(), "linear")


LAYER_NORM_EPS = 1e-5  # F.layer_norm's default, so token_scale is the scale it divides by


def normalize_input(t: torch.Tensor, part: nn.Module) -> torch.Tensor:
    """Parameter-free layer normalisation of one boundary tensor, as a synthesizer sees it.

    Per position for the token model ((B, T, D): over D), per example otherwise (over
    every dimension but the batch). The prediction then no longer scales with the
    activation, which breaks the loop in which a stage grows its output along the
    synthesizer's own prediction and the prediction grows with it.
    """
    if isinstance(part, TokenSynth):
        return F.layer_norm(t, t.shape[-1:], eps=LAYER_NORM_EPS)
    return F.layer_norm(t, t.shape[1:])


def token_scale(t: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, T, 1): each position's standard deviation over D, as a LayerNorm
    computes it (population variance plus :data:`LAYER_NORM_EPS`).

    A residual stream reaches every later layer of a pre-norm transformer through a
    LayerNorm, so its true gradient is divided by this scale: when a stage grows its
    output, the gradient coming back shrinks. The token model's normalised prediction is
    divided by it too, so that a growing stream is not pushed on as hard as before.
    """
    return (t.var(-1, unbiased=False, keepdim=True) + LAYER_NORM_EPS).sqrt()


class BoundarySynthesizer(nn.Module):
    """The synthesizer of one stage boundary: one sub-model per tensor of the boundary.

    ``forward(h, y)`` takes the boundary's tensors as a tuple and returns a tuple of the
    same length with a per-example gradient prediction for every floating-point tensor
    and ``None`` for the others (integer masks, indices), which get no gradient.

    Args:
        parts, shapes: one sub-model and per-example shape per boundary tensor (``None``
            for a tensor that gets no gradient).
        normalize: the sub-models see :func:`normalize_input` of their tensor; a token
            model's prediction is then divided by :func:`token_scale` of it.
        bound: :meth:`bound_` scales a prediction whose RMS exceeds ``bound`` times the
            running RMS of the targets seen by :meth:`observe`; ``None``: no bound.
        min_quality: :meth:`bound_` zeroes the predictions of a tensor until the running
            fraction of target variance its model explains, :attr:`quality`, reaches this
            (``None``: never).
        momentum: weight of a new batch in those running averages (exponential).

    The running averages of every tensor are the buffers ``target_rms`` (RMS of the
    per-example targets) and ``error_ms`` (mean squared regression error), with
    ``observed`` counting the regression steps folded in (0: no target yet), so they are
    saved and restored with the synthesizer's state.
    """

    def __init__(self, parts: Sequence[nn.Module | None], shapes: Sequence[tuple[int, ...] | None],
                 normalize: bool = False, bound: float | None = None, min_quality: float | None = None,
                 momentum: float = 0.1):
        super().__init__()
        self.parts = nn.ModuleList([p if p is not None else nn.Identity() for p in parts])
        self.has_part = [p is not None for p in parts]
        self.shapes = [tuple(s) if s is not None else None for s in shapes]
        self.normalize = normalize
        self.bound = bound
        self.min_quality = min_quality
        self.momentum = momentum
        device = next((p.device for p in self.parameters()), None)
        for name in self._RUNNING:  # float64: the averages are scalars, and exact across devices
            self.register_buffer(name, torch.zeros(len(self.parts), dtype=torch.float64, device=device))
        self.register_buffer("observed", torch.zeros(len(self.parts), dtype=torch.int64, device=device))

    _RUNNING = ("target_rms", "error_ms")
    target_rms: torch.Tensor  # (buffers, registered in __init__)
    error_ms: torch.Tensor
    observed: torch.Tensor

    @property
    def tracks(self) -> bool:
        """Whether the running target and error averages are kept (a bound or a quality gate)."""
        return self.bound is not None or self.min_quality is not None

    @property
    def quality(self) -> torch.Tensor:
        """Per tensor: ``1 - error_ms / target_rms^2``, the running fraction of the targets'
        power the model explains (1: perfect; 0: no better than predicting zero; NaN: no
        target yet). Shape (number of boundary tensors,)."""
        return 1.0 - self.error_ms / self.target_rms.square()

    def forward(self, h: Sequence[torch.Tensor], y: torch.Tensor | None = None) -> Tensors:
        if len(h) != len(self.parts):
            raise ValueError(f"synthesizer was built for {len(self.parts)} boundary tensors, got {len(h)}")
        return tuple(self._predict(part, t, y) if has else None
                     for part, has, t in zip(self.parts, self.has_part, h, strict=True))

    def _predict(self, part: nn.Module, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if not self.normalize:
            return part(t, y)
        pred = part(normalize_input(t, part), y)
        if isinstance(part, TokenSynth):
            pred = pred / token_scale(t)  # the following LayerNorm's scale (see token_scale)
        return pred

    @torch.no_grad()
    def observe(self, targets: Sequence[torch.Tensor | None], errors: Sequence[float | None]) -> None:
        """Fold one regression step into the running averages (only with a bound or gate).

        Args:
            targets: the gradients of the batch-mean loss, ``dL/dh``, one per tensor (``None``
                where none flows); their per-example version is ``B * dL/dh``.
            errors: the mean squared error of each tensor's prediction against its
                per-example target, before the step (``None`` where none).
        """
        if not self.tracks:
            return
        for i, (g, err) in enumerate(zip(targets, errors, strict=False)):
            if g is None or err is None or i >= len(self.parts) or not self.has_part[i] or g.numel() == 0:
                continue
            flat = g.detach().reshape(-1).float()
            rms = float(torch.dot(flat, flat) / flat.numel()) ** 0.5 * g.shape[0]
            if not (math.isfinite(rms) and math.isfinite(err)):
                continue  # a non-finite target must not poison the averages for good
            first = int(self.observed[i]) == 0
            for buf, value in ((self.target_rms, rms), (self.error_ms, err)):
                old = float(buf[i])
                buf[i] = value if first else old + self.momentum * (value - old)
            self.observed[i] += 1

    @torch.no_grad()
    def bound_(self, pred: Sequence[torch.Tensor | None]) -> Tensors:
        """Apply the quality gate and the bound to predictions, in place.

        A tensor whose :attr:`quality` is below ``min_quality`` (or not known yet) gets a
        zero prediction. Otherwise a prediction whose RMS exceeds ``bound * target_rms`` is
        scaled down to that; the whole batch by one factor, so its direction is kept.
        Before any target was observed the bound leaves the prediction as it is.
        """
        if not self.tracks:
            return tuple(pred)
        quality = self.quality
        for i, p in enumerate(pred):
            if p is None or p.numel() == 0:
                continue
            if self.min_quality is not None and not float(quality[i]) >= self.min_quality:  # (NaN: not yet)
                p.zero_()
                continue
            if self.bound is None or int(self.observed[i]) == 0:
                continue
            limit = self.bound * float(self.target_rms[i])
            flat = p.reshape(-1).float()
            rms = float(torch.dot(flat, flat) / flat.numel()) ** 0.5
            if rms > limit:
                p.mul_(limit / rms)
        return tuple(pred)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # A synthesizer saved before the running averages existed starts without them.
        for name in (*self._RUNNING, "observed"):
            if prefix + name not in state_dict:
                state_dict = {**state_dict, prefix + name: torch.zeros_like(getattr(self, name))}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class Synthesizer:
    """Recipe for the synthetic-gradient model of every stage boundary.

    Args:
        kind: ``"linear"`` (option ``classifier``: with ``conditional``, add the term shaped
            like a softmax classifier's input gradient, :class:`LinearSynth`; on by
            default; option ``critic``: the hidden units of a ReLU classifier whose input
            gradient is added as well, 0 (the default) for none), ``"lowrank"`` (option
            ``rank``), ``"mlp"`` (options ``hidden``, ``depth``), ``"conv"`` ((B, C, L),
            (B, C, H, W) or (B, C, D, H, W) activations; ``hidden``, ``depth``,
            ``kernel_size``), ``"token"`` (3-D activations; ``hidden``,
            ``depth``, ``classifier``: with ``conditional``, add the term shaped like the
            input gradient of a LayerNorm'd softmax head, :class:`TokenSynth`; on by
            default), ``"auto"`` (conv for a convolution's feature maps of any rank and for
            other 4-D activations, token for other 3-D ones, linear otherwise), or a callable
            ``(boundary_index, example_activation) -> nn.Module`` for a custom model whose
            ``forward(h, y)`` returns the per-example gradient of one tensor.
        conditional: cDNI; condition on one-hot labels (needs ``num_classes``).
        num_classes: number of label classes for the one-hot encoding.
        normalize: the built-in models see each activation layer-normalised (no
            parameters; per example, per position for ``"token"``), so a prediction does not
            grow with the activation's scale (see :func:`normalize_input`); a ``"token"``
            prediction is divided by each position's scale, as a following LayerNorm
            divides the true gradient (:func:`token_scale`). A custom
            callable's model always sees the activation as it is.
        bound: a prediction whose RMS exceeds ``bound`` times the running RMS of the
            targets it was trained on is scaled down to that (one factor per batch, so the
            direction is kept); ``None``: unbounded.
        min_quality: a boundary's synthetic gradient is zero until its model explains at
            least this fraction of the targets' power (running ``1 - MSE / mean(target^2)``
            over recent regression steps, each measured before the step); ``None``: used
            from the first prediction.
        target_momentum: weight of each new batch of targets in those running averages.
        replay: regression steps per target. Each target the model is trained on is
            revisited in the next ``replay - 1`` regression steps: the model steps on the
            new target, then on each kept one, newest first. The stage keeps the
            ``replay - 1`` last (activation, labels, target) triples for it; 1: each target
            once, as in the DNI paper. The running averages (bound, gate) see only new
            targets, so the quality stays measured on targets the model has not fitted.
            (Stage boundaries only: :class:`~synthpipe.TemporalTrainer` regresses each
            truncation boundary's target once.)
        **options: passed to the model's constructor (``rank``, ``hidden``, ``depth``, ...).

    Every model's output layer starts at zero, so the first synthetic gradients are zero.

    Raises:
        ValueError: an unknown kind or option, a size that is not a whole number >= 1,
            ``classifier`` not a bool,
            ``conditional`` without ``num_classes``, ``bound`` not a positive finite number,
            ``target_momentum`` outside (0, 1], or ``replay`` not a whole number >= 1.
    """

    def __init__(self, kind: Union[str, Callable[[int, torch.Tensor], nn.Module]] = "linear",
                 conditional: bool = False, num_classes: int | None = None,
                 normalize: bool = DEFAULT_NORMALIZE, bound: float | None = DEFAULT_BOUND,
                 min_quality: float | None = DEFAULT_MIN_QUALITY, target_momentum: float = 0.1,
                 replay: int = DEFAULT_REPLAY, **options: Any):
        if not (isinstance(kind, str) or callable(kind)) or (isinstance(kind, str) and kind not in KINDS):
            raise ValueError(f"unknown synthesizer kind {kind!r}; choose one of {', '.join(KINDS)} or pass a callable")
        if conditional and not num_classes:
            raise ValueError("a conditional synthesizer (cDNI) needs num_classes")
        if conditional and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(kind, str):
            _check_options(kind, options)
        if options.get("critic") and not conditional:
            raise ValueError(f"the critic term (critic={options['critic']}) is a classifier's input gradient and "
                             f"needs the labels: pass conditional=True and num_classes")
        if kind in ("conv", "auto") and "kernel_size" in options and options["kernel_size"] % 2 == 0:
            raise ValueError(f"the conv synthesizer's kernel_size must be odd (it keeps the spatial size "
                             f"with padding kernel_size // 2), got {options['kernel_size']}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        if isinstance(replay, bool) or not isinstance(replay, int) or replay < 1:
            raise ValueError(f"replay must be a whole number >= 1 (regression steps per target), got {replay!r}")
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))
                                  or not 0 < bound < float("inf")):
            raise ValueError(f"bound must be a positive, finite number (or None), got {bound!r}")
        if min_quality is not None and (isinstance(min_quality, bool) or not isinstance(min_quality, (int, float))
                                        or not -math.inf < min_quality < 1):
            raise ValueError(f"min_quality must be a number below 1 (or None), got {min_quality!r}")
        if (isinstance(target_momentum, bool) or not isinstance(target_momentum, (int, float))
                or not 0 < target_momentum <= 1):
            raise ValueError(f"target_momentum must be a number in (0, 1], got {target_momentum!r}")
        self.kind = kind
        self.conditional = conditional
        self.num_classes = num_classes if conditional else None
        self.normalize = normalize
        self.bound = None if bound is None else float(bound)
        self.min_quality = None if min_quality is None else float(min_quality)
        self.target_momentum = float(target_momentum)
        self.replay = replay
        self.options = options

    def __repr__(self) -> str:
        kind = self.kind if isinstance(self.kind, str) else getattr(self.kind, "__name__", "custom")
        return (f"Synthesizer({kind!r}, conditional={self.conditional}, "
                f"num_classes={self.num_classes}, normalize={self.normalize}, bound={self.bound}, "
                f"min_quality={self.min_quality}, replay={self.replay}, "
                f"**{self.options})")

    def build(self, boundary: int, example: Sequence[torch.Tensor],
              module: nn.Module | None = None) -> BoundarySynthesizer:
        """Make the synthesizer for boundary ``boundary`` from an example of its tensors.

        Only per-example shapes are used: batch size (and, for "token", sequence length)
        may change afterwards. The module is created on ``example``'s device and dtype.

        Args:
            boundary: the boundary's index (the stage in front of it), for messages.
            example: the boundary's tensors, each (B, ...).
            module: the stage that produced them; ``"auto"`` looks at its layers to tell a
                convolution's (B, C, L) feature map (``conv``) from a (B, T, D) sequence (``token``).

        Raises:
            ValueError: an unbatched tensor, or activations the chosen kind cannot take.
        """
        parts: list[nn.Module | None] = []
        shapes: list[tuple[int, ...] | None] = []
        for t in example:
            if not (torch.is_tensor(t) and t.dtype.is_floating_point):
                parts.append(None)
                shapes.append(None)
                continue
            if t.dim() < 2:
                raise ValueError(
                    f"boundary {boundary}: a synthesizer needs batched activations (B, ...), "
                    f"got shape {tuple(t.shape)}")
            if callable(self.kind):
                part = self.kind(boundary, t)
            else:
                kind = _auto_kind(t, module) if self.kind == "auto" else self.kind
                builder = _BUILDERS[kind]
                options = self.options
                if self.kind == "auto":  # options of the other kinds do not apply
                    accepted = inspect.signature(builder).parameters
                    options = {k: v for k, v in options.items() if k in accepted}
                if kind == "linear":
                    _check_linear_size(boundary, tuple(t.shape[1:]), self.num_classes)
                try:
                    part = builder(tuple(t.shape[1:]), self.num_classes, **options)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"boundary {boundary} (activations {tuple(t.shape)}): the {kind} synthesizer "
                                     f"cannot take them: {e}") from e
            parts.append(part.to(device=t.device, dtype=t.dtype))
            shapes.append(tuple(t.shape[1:]))
        # A custom model sees the activation as it is: it may need the scale (an oracle does).
        normalize = self.normalize and isinstance(self.kind, str)
        synth = BoundarySynthesizer(parts, shapes, normalize=normalize, bound=self.bound,
                                    min_quality=self.min_quality, momentum=self.target_momentum)
        return synth.to(example_device(example))
