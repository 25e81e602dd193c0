"""Runners: how an encoder family runs its modules up to the deepest level asked for, and pools.

:class:`~featstore.encoders.model.Encoder` is the same for every family; the family-specific
part (build kwargs, forward up to the deepest level, pooling, the modules that run) lives in a
runner, chosen by the spec's ``family`` from :data:`RUNNERS` (a registry, not an if-chain).
CNNs use :class:`StepRunner` (top-level ``steps`` in order, taps global-average pooled);
Vision Transformers use :class:`featstore.encoders.vit.TokenRunner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from featstore.encoders.registry import EncoderSpec
from featstore.encoders.vit import TokenRunner
from featstore.errors import EncoderError


class StepRunner:
    """CNN: run the spec's top-level ``steps`` up to the deepest tap; pool each tap on the fly.

    Each tap is global-average pooled in float32 as soon as it is produced, so later in-place
    ops cannot touch it.
    """

    poolings: dict[str, str] = {"avg": "global average (float32)"}

    def __init__(self, spec: EncoderSpec, model: nn.Module) -> None:
        self.spec = spec
        self._steps = [(n, model.get_submodule(n)) for n in spec.steps]
        self._tap_at: dict[int, list[int]] = {}
        self._depth = 0
        self.train_last = 0                       # > 0: steps before the last N run under no_grad

    @staticmethod
    def build_kwargs(spec: EncoderSpec) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` (the spec's, as they are)."""
        return dict(spec.timm_kwargs)

    def plan(self, levels: Sequence[int]) -> None:
        """Prepare forward for *levels* (validated, sorted, unique)."""
        step_index = {n: i for i, n in enumerate(self.spec.steps)}
        self._tap_at = {}
        for k in levels:
            self._tap_at.setdefault(step_index[self.spec.taps[k]], []).append(k)
        self._depth = max(self._tap_at) + 1       # steps actually run

    def dim(self, level: int, pooling: str) -> int:
        """Feature width of *level* pooled with *pooling*."""
        return self.spec.dims[level]

    def forward(self, x: Tensor, pooling: str) -> dict[int, Tensor]:
        """(B, 3, H, W) -> {level: (B, C) float32} for the planned levels."""
        out: dict[int, Tensor] = {}
        grad, frozen = torch.is_grad_enabled(), self._depth - self.train_last if self.train_last else 0
        for i in range(self._depth):
            with torch.set_grad_enabled(grad and i >= frozen):
                x = self._steps[i][1](x)
            for k in self._tap_at.get(i, ()):
                out[k] = x.mean(dim=(2, 3), dtype=torch.float32)  # no fp32 copy of the map
        return out

    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """(timm path, module) of the steps the planned levels run, in order."""
        return list(self._steps[: self._depth])

    def units(self) -> list[tuple[str, nn.Module]]:
        """The countable stages of ``--train-blocks``: the steps run, in order."""
        return self.stage_modules()

    def tail_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules trained with the last N stages besides them (none for a CNN)."""
        return []

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters used by forward that belong to no stage module (none for a CNN)."""
        return []

    def provenance(self, levels: Sequence[int], pooling: str) -> dict[str, Any]:
        """Family-specific provenance entries (the pooling description)."""
        return {"pooling": self.poolings[pooling]}


RUNNERS: dict[str, type] = {
    "resnet": StepRunner,
    "densenet": StepRunner,
    "efficientnet": StepRunner,
    "vit": TokenRunner,
    "dinov2": TokenRunner,
}


def runner_class(spec: EncoderSpec) -> type:
    """The runner class of *spec*'s family; an unknown family raises :class:`EncoderError`."""
    try:
        return RUNNERS[spec.family]
    except KeyError:
        raise EncoderError(f"encoder {spec.name}: family {spec.family!r} has no runner; "
                           f"known families: {', '.join(sorted(RUNNERS))}") from None


__all__ = ["RUNNERS", "StepRunner", "runner_class"]
