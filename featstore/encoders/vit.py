"""Vision Transformer runner: truncation by blocks, CLS / mean / CLS+mean pooling, one pass.

Level ``minus K`` of a ``depth``-block ViT is the output of block ``depth-1-K``. The forward
is timm's ``forward_features`` written out (``patch_embed`` -> ``_pos_embed`` -> ``patch_drop``
-> ``norm_pre`` -> ``blocks[:n]``) and stops after the deepest block asked for; every
requested block output goes through the model's final norm (:data:`FINAL_NORM`, the same rule
for every model) and is pooled in float32. So a truncated level is bit-identical in fp32 to
``norm(blocks[i] output)`` of the full network, and minus 0 is timm's own
``forward_features`` pooled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from featstore.encoders.registry import EncoderSpec
from featstore.errors import EncoderError

FINAL_NORM = "every level"
FINAL_NORM_NOTE = ("the final norm (model.norm) is applied to the block output at every level, "
                   "as timm forward_intermediates(norm=True) / DINOv2 get_intermediate_layers do")

# Parameters that the embedding uses outside any module (timm VisionTransformer attributes).
_TOKEN_PARAMS = ("cls_token", "reg_token", "pos_embed")
_EMBED_MODULES = ("patch_embed", "pos_drop", "patch_drop", "norm_pre")


@dataclass(frozen=True)
class Pooling:
    """A pooling of (B, N, D) tokens with *prefix* leading CLS/register tokens -> (B, width*D)."""

    fn: Callable[[Tensor, int], Tensor]
    width: int
    note: str


def _cls(x: Tensor, prefix: int) -> Tensor:
    return x[:, 0].to(torch.float32, copy=True)


def _mean(x: Tensor, prefix: int) -> Tensor:
    return x[:, prefix:].mean(dim=1, dtype=torch.float32)


def _cls_mean(x: Tensor, prefix: int) -> Tensor:
    return torch.cat((_cls(x, prefix), _mean(x, prefix)), dim=1)


POOLINGS: dict[str, Pooling] = {
    "cls": Pooling(_cls, 1, "CLS token"),
    "mean": Pooling(_mean, 1, "mean of the patch tokens (CLS and register tokens excluded)"),
    "cls+mean": Pooling(_cls_mean, 2, "CLS token concatenated with the mean of the patch tokens "
                                      "(registers excluded), as Virchow2"),
}


def _mlp_layers() -> dict[str, type]:
    from timm.layers import Mlp, SwiGLU, SwiGLUPacked

    return {"mlp": Mlp, "swiglu": SwiGLU, "swiglu_packed": SwiGLUPacked}


class TokenRunner:
    """Run a timm ``VisionTransformer`` up to the deepest requested block and pool its tokens."""

    poolings: dict[str, str] = {name: p.note for name, p in POOLINGS.items()}

    def __init__(self, spec: EncoderSpec, model: nn.Module) -> None:
        self.spec = spec
        self.model = model
        index = {id(b): i for i, b in enumerate(model.blocks)}
        self.block: dict[int, int] = {}           # level -> block index
        for k in spec.levels:
            i = index.get(id(model.get_submodule(spec.taps[k])))
            if i is None:
                raise EncoderError(f"encoder {spec.name}: tap {spec.taps[k]} is not a transformer block")
            self.block[k] = i
        self.prefix = int(model.num_prefix_tokens)   # CLS + register tokens
        self._at: dict[int, list[int]] = {}
        self._n = 0
        self.train_last = 0     # > 0: embedding and blocks before the last N run under no_grad

    @staticmethod
    def build_kwargs(spec: EncoderSpec) -> dict[str, Any]:
        """``timm.create_model`` kwargs: the spec's, with ``mlp_layer`` names made classes."""
        kw = dict(spec.timm_kwargs)
        if "mlp_layer" in kw:
            layers = _mlp_layers()
            if kw["mlp_layer"] not in layers:
                raise EncoderError(f"encoder {spec.name}: mlp_layer {kw['mlp_layer']!r} is not one "
                                   f"of {', '.join(layers)}")
            kw["mlp_layer"] = layers[kw["mlp_layer"]]
        return kw

    def plan(self, levels: Sequence[int]) -> None:
        """Prepare forward for *levels*: the blocks to run and where each level is taken."""
        self._at = {}
        for k in levels:
            self._at.setdefault(self.block[k], []).append(k)
        self._n = max(self._at) + 1               # blocks actually run

    def dim(self, level: int, pooling: str) -> int:
        """Feature width of *level* pooled with *pooling* (``cls+mean`` doubles it)."""
        return self.spec.dims[level] * POOLINGS[pooling].width

    def _embed(self, x: Tensor) -> Tensor:
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def forward(self, x: Tensor, pooling: str) -> dict[int, Tensor]:
        """(B, 3, H, W) -> {level: (B, D) float32}; blocks after the deepest level never run."""
        pool = POOLINGS[pooling].fn
        grad, frozen = torch.is_grad_enabled(), self._n - self.train_last if self.train_last else 0
        with torch.set_grad_enabled(grad and not self.train_last):
            x = self._embed(x)
        out: dict[int, Tensor] = {}
        for i in range(self._n):
            with torch.set_grad_enabled(grad and i >= frozen):
                x = self.model.blocks[i](x)
            for k in self._at.get(i, ()):
                out[k] = pool(self.model.norm(x), self.prefix)
        return out

    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """(timm path, module) run for the planned levels: embedding, blocks[:n], final norm."""
        m = self.model
        mods = [(n, m.get_submodule(n)) for n in _EMBED_MODULES]
        mods += [(f"blocks.{i}", m.blocks[i]) for i in range(self._n)]
        return mods + [("norm", m.norm)]

    def units(self) -> list[tuple[str, nn.Module]]:
        """The countable stages of ``--train-blocks``: the transformer blocks run, in order."""
        return [(f"blocks.{i}", self.model.blocks[i]) for i in range(self._n)]

    def tail_modules(self) -> list[tuple[str, nn.Module]]:
        """Trained with the last N blocks: the final norm (every level goes through it)."""
        return [("norm", self.model.norm)]

    def extra_parameters(self) -> list[nn.Parameter]:
        """CLS token, register tokens and position embedding (used, but in no stage module)."""
        params = (getattr(self.model, n, None) for n in _TOKEN_PARAMS)
        return [p for p in params if isinstance(p, nn.Parameter)]

    def provenance(self, levels: Sequence[int], pooling: str) -> dict[str, Any]:
        """Pooling, final-norm rule, block index per level, depth and the build kwargs."""
        return {
            "pooling": pooling,
            "pooling_note": POOLINGS[pooling].note,
            "final_norm": FINAL_NORM,
            "final_norm_note": FINAL_NORM_NOTE,
            "blocks": {str(k): self.block[k] for k in levels},
            "depth": len(self.model.blocks),
            "prefix_tokens": self.prefix,
            "timm_kwargs": dict(self.spec.timm_kwargs),
        }


__all__ = ["FINAL_NORM", "POOLINGS", "Pooling", "TokenRunner"]
