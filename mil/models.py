"""MIL heads over bags of patch embeddings: ABMIL (plain, gated), mean and max pooling.

Every head is a plain ``nn.Module`` taking one bag ``(N, D)`` (or a padded batch ``(B, N, D)``
with a boolean ``mask`` ``(B, N)``) and returning ``(logits, attention)``:

* ``logits``: ``(C,)`` for one bag, ``(B, C)`` for a batch;
* ``attention``: raw (pre-softmax) per-instance scores ``(N,)`` / ``(B, N)``, or ``None`` for a
  head that has none (mean pooling).

Heads know nothing about training or stores, so the top-k fine-tuner can put an encoder in
front of one. ``create_mil_model(**model.config)`` rebuilds any head from its config dict.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from mil.errors import MilError

ModelOutput = tuple[Tensor, Tensor | None]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Decorator adding a head factory to the registry under *name*."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Names accepted by :func:`create_mil_model`."""
    return sorted(_REGISTRY)


def create_mil_model(name: str, in_dim: int, n_classes: int = 2, **widths) -> nn.Module:
    """Build the head *name* (``abmil``, ``abmil-gated``, ``mean``, ``max``) with *n_classes*
    outputs (class logits; 1 for a Cox risk or a regression value, one per time bin for NLL survival).

    *widths* are ``hidden`` (tuple of MLP widths), ``attn_dim`` and ``dropout``; keys a head does
    not use are rejected so a typo does not pass silently.
    """
    if name not in _REGISTRY:
        raise MilError(f"unknown MIL model {name!r}; choose one of {', '.join(list_models())}")
    if name == "max" and n_classes < 2:
        raise MilError("model 'max' picks a bag's instance by its class logits, so it needs two or more outputs")
    if in_dim < 1 or n_classes < 1:
        raise MilError(f"model {name!r} needs in_dim >= 1 and at least one output "
                       f"(got in_dim={in_dim}, n_classes={n_classes})")
    try:
        return _REGISTRY[name](in_dim=in_dim, n_classes=n_classes, **widths)
    except TypeError as exc:
        raise MilError(f"model {name!r}: bad option ({exc}); valid: hidden, attn_dim, dropout") from None


class Standardize(nn.Module):
    """Per-feature (x - mean) / std with statistics fitted on the training instances.

    Embeddings differ in scale by orders of magnitude between encoders, weights and truncation
    levels (random-weight ResNet features have std ~1e-2); standardising makes one learning
    rate work for all of them. The statistics are buffers, so they travel in the state_dict.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _mlp(in_dim: int, hidden: Sequence[int], dropout: float) -> tuple[nn.Sequential, int]:
    """Instance encoder: Standardize, then Linear -> ReLU -> Dropout per hidden width."""
    layers: list[nn.Module] = [Standardize(in_dim)]
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, int(h)), nn.ReLU(), nn.Dropout(dropout)]
        d = int(h)
    return nn.Sequential(*layers), d


def _unbatched(bag: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    """Return (bags (B, N, D), mask (B, N) bool, was_single)."""
    if bag.dim() == 2:
        bag = bag.unsqueeze(0)
        single = True
    elif bag.dim() == 3:
        single = False
    else:
        raise MilError(f"a bag must be (N, D) or (B, N, D); got shape {tuple(bag.shape)}")
    if mask is None:
        mask = torch.ones(bag.shape[:2], dtype=torch.bool, device=bag.device)
    elif single and mask.dim() == 1:
        mask = mask.unsqueeze(0)
    return bag, mask.bool(), single


class _Head(nn.Module):
    """Shared config bookkeeping: ``self.config`` rebuilds the head via create_mil_model."""

    name = ""

    def __init__(self, in_dim: int, n_classes: int, hidden: Sequence[int], dropout: float, **extra):
        super().__init__()
        if any(int(h) < 1 for h in hidden):
            raise MilError(f"hidden widths must be positive integers; got {list(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise MilError(f"dropout={dropout} must lie in [0, 1)")
        self.in_dim, self.n_classes = int(in_dim), int(n_classes)
        self.config = {"name": self.name, "in_dim": self.in_dim, "n_classes": self.n_classes,
                       "hidden": [int(h) for h in hidden], "dropout": float(dropout), **extra}
        self.features, self.out_dim = _mlp(in_dim, hidden, dropout)

    @torch.no_grad()
    def set_input_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise inputs with these per-feature statistics (tiny std clamped)."""
        norm = self.features[0]
        norm.mean.copy_(torch.as_tensor(mean, dtype=norm.mean.dtype))
        norm.std.copy_(torch.as_tensor(std, dtype=norm.std.dtype).clamp(min=1e-6))


class ABMIL(_Head):
    """Attention MIL (Ilse et al. 2018): instance MLP, (gated) attention pooling, linear classifier.

    Defaults follow HistoTransfer's head (fc 256 -> 64, attention 32); CLAM-like widths are
    ``hidden=(512,), attn_dim=256``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256, 64), attn_dim: int = 32,
                 gated: bool = False, dropout: float = 0.25, n_classes: int = 2):
        self.name = "abmil-gated" if gated else "abmil"
        super().__init__(in_dim, n_classes, hidden, dropout, attn_dim=int(attn_dim))
        self.gated = gated
        self.attn_v = nn.Sequential(nn.Linear(self.out_dim, attn_dim), nn.Tanh())
        self.attn_u = nn.Sequential(nn.Linear(self.out_dim, attn_dim), nn.Sigmoid()) if gated else None
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(self.out_dim, n_classes)

    def forward(self, bag: Tensor, mask: Tensor | None = None) -> ModelOutput:
        x, m, single = _unbatched(bag, mask)
        h = self.features(x)                                    # (B, N, H)
        a = self.attn_v(h)
        if self.attn_u is not None:
            a = a * self.attn_u(h)
        raw = self.attn_w(a).squeeze(-1)                        # (B, N) pre-softmax
        w = torch.softmax(raw.masked_fill(~m, float("-inf")), dim=1)
        logits = self.classifier(torch.einsum("bn,bnh->bh", w, h))
        return (logits[0], raw[0]) if single else (logits, raw)


class _PoolHead(_Head):
    """Instance MLP + linear classifier, pooled without attention (the baselines)."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256, 64), dropout: float = 0.25,
                 n_classes: int = 2):
        super().__init__(in_dim, n_classes, hidden, dropout)
        self.classifier = nn.Linear(self.out_dim, n_classes)


class MeanMIL(_PoolHead):
    """Baseline: instance MLP, mean over instances, linear classifier. No attention."""

    name = "mean"

    def forward(self, bag: Tensor, mask: Tensor | None = None) -> ModelOutput:
        x, m, single = _unbatched(bag, mask)
        h = self.features(x) * m.unsqueeze(-1)
        pooled = h.sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        logits = self.classifier(pooled)
        return (logits[0], None) if single else (logits, None)


class MaxMIL(_PoolHead):
    """Baseline (mi-Net style): per-instance class logits; the bag takes the logits of its most
    suspicious instance.

    An instance's score (returned as "attention") is its evidence for the non-reference
    classes, ``logsumexp(logits[1:]) - logits[0]`` (binary: its positive log-odds); the bag's
    logits are those of its highest-scoring instance, so binary P(positive) = max over instances.
    """

    name = "max"

    def forward(self, bag: Tensor, mask: Tensor | None = None) -> ModelOutput:
        x, m, single = _unbatched(bag, mask)
        inst = self.classifier(self.features(x))                # (B, N, C)
        score = torch.logsumexp(inst[..., 1:], dim=-1) - inst[..., 0]
        top = score.masked_fill(~m, float("-inf")).argmax(1)    # (B,)
        logits = inst[torch.arange(inst.shape[0], device=inst.device), top]
        return (logits[0], score[0]) if single else (logits, score)


@register_model("abmil")
def _abmil(in_dim: int, n_classes: int = 2, hidden: Sequence[int] = (256, 64), attn_dim: int = 32,
           dropout: float = 0.25) -> nn.Module:
    return ABMIL(in_dim, hidden, attn_dim, gated=False, dropout=dropout, n_classes=n_classes)


@register_model("abmil-gated")
def _abmil_gated(in_dim: int, n_classes: int = 2, hidden: Sequence[int] = (256, 64),
                 attn_dim: int = 32, dropout: float = 0.25) -> nn.Module:
    return ABMIL(in_dim, hidden, attn_dim, gated=True, dropout=dropout, n_classes=n_classes)


@register_model("mean")
def _mean(in_dim: int, n_classes: int = 2, hidden: Sequence[int] = (256, 64), dropout: float = 0.25,
          attn_dim: int | None = None) -> nn.Module:
    return MeanMIL(in_dim, hidden, dropout, n_classes)  # attn_dim accepted so one CLI fits all


@register_model("max")
def _max(in_dim: int, n_classes: int = 2, hidden: Sequence[int] = (256, 64), dropout: float = 0.25,
         attn_dim: int | None = None) -> nn.Module:
    return MaxMIL(in_dim, hidden, dropout, n_classes)


def model_from_config(config: dict) -> nn.Module:
    """Rebuild a head from its ``.config`` dict (as saved in model.pt)."""
    cfg = dict(config)
    name = cfg.pop("name")
    return create_mil_model(name, cfg.pop("in_dim"), cfg.pop("n_classes"), **cfg)
