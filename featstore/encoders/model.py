"""Encoder: one forward pass -> {truncation level: pooled (B, D) float32 features}.

The full timm model is built and loaded first (weights always go into the full network), then
the family's runner (featstore.encoders.runners) runs it up to the deepest requested level
only: deeper stages / blocks are never computed. CNN taps are global-average pooled, ViT
blocks pooled by CLS / mean / CLS+mean (featstore.encoders.vit), always in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from featstore.core.runtime import hub_offline
from featstore.encoders.foundation import build_kwargs
from featstore.encoders.registry import EncoderSpec, get_spec, tagged_spec
from featstore.encoders.runners import runner_class
from featstore.encoders.weights import Checkpoint, ResolvedWeights, load_weights, resolve_weights
from featstore.errors import EncoderError

log = logging.getLogger(__name__)


class Encoder(nn.Module):
    """A truncatable timm encoder returning pooled features for a set of levels."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, levels: Sequence[int],
                 resolved: ResolvedWeights, checkpoint: Checkpoint | None = None,
                 pooling: str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.model = model                      # the FULL timm model (timm key layout)
        self.name = spec.name
        self.weights_tag = resolved.tag
        self.weights_sha256 = checkpoint.sha256 if checkpoint else None
        self._resolved = resolved
        self._meta = dict(checkpoint.meta) if checkpoint else {}
        pre = self._meta.get("preprocessing") or {}
        wspec = resolved.spec
        self.input_size: int = int(pre.get("input_size", spec.input_size))
        self.mean: tuple = tuple(pre.get("mean") or (wspec and wspec.mean) or spec.mean)
        self.std: tuple = tuple(pre.get("std") or (wspec and wspec.std) or spec.std)
        self.interpolation: str = str(pre.get("interpolation", spec.interpolation))
        self.channels_last = False
        self._runner = runner_class(spec)(spec, model)
        self.pooling: str = self._check_pooling(spec.pooling if pooling is None else pooling)
        self.set_levels(levels)

    def _check_pooling(self, pooling: str) -> str:
        if pooling not in self._runner.poolings:
            raise EncoderError(f"encoder {self.name}: pooling {pooling!r} is not one of "
                               f"{', '.join(self._runner.poolings)}")
        return pooling

    # ------------------------------------------------------------ levels and forward
    def set_levels(self, levels: Sequence[int]) -> None:
        """Choose the levels returned by forward (validated, sorted, unique)."""
        if isinstance(levels, int):
            levels = (levels,)
        lv = tuple(sorted({self.spec.check_level(int(x)) for x in levels}))
        if not lv:
            raise EncoderError(f"encoder {self.name}: ask for at least one level (minus K)")
        self.levels: tuple[int, ...] = lv
        self.dims: dict[int, int] = {k: self._runner.dim(k, self.pooling) for k in lv}
        self._runner.plan(lv)
        if self._runner.train_last:              # keep the frozen prefix in step with the levels
            self.set_trainable(self._runner.train_last)

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        """Normalised (B, 3, H, W) -> {level: (B, D) float32}, stopping at the deepest level."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._runner.forward(x, self.pooling)
        return {k: out[k] for k in self.levels}

    # ------------------------------------------------------------ fine-tuning support
    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """(timm path, module) of what the current levels run, in order."""
        return self._runner.stage_modules()

    def trainable_modules(self, last: int = 0) -> list[tuple[str, nn.Module]]:
        """(timm path, module) fine-tuned with ``--train-blocks last``: 0 = every stage the
        levels run; N = the last N blocks (ViT, plus the final norm) / stages (CNN) of them."""
        if not last:
            return self.stage_modules()
        units = self._runner.units()
        if not 0 < last <= len(units):
            raise EncoderError(f"encoder {self.name}: cannot train the last {last} blocks, levels "
                               f"{list(self.levels)} run {len(units)}; give 0..{len(units)}")
        return units[len(units) - last:] + self._runner.tail_modules()

    def trainable_parameters(self, last: int = 0) -> Iterator[nn.Parameter]:
        """Parameters of :meth:`trainable_modules` (deeper stages / blocks get no gradient);
        with ``last == 0`` a ViT's CLS/register tokens and position embedding come first."""
        if not last:
            yield from self._runner.extra_parameters()
        for _, module in self.trainable_modules(last):
            yield from module.parameters()

    @property
    def train_last(self) -> int:
        """The N of :meth:`set_trainable` (0: every stage the levels run)."""
        return self._runner.train_last

    def set_trainable(self, last: int = 0) -> list[nn.Parameter]:
        """Give gradients only to :meth:`trainable_parameters` (*last*) and return them; with
        ``last > 0`` the frozen prefix runs under ``torch.no_grad`` (no activations kept; the
        outputs are the same)."""
        params = list(self.trainable_parameters(last))
        self.model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self._runner.train_last = int(last)
        return params

    def set_batchnorm_eval(self) -> None:
        """Put every BatchNorm in eval mode (call after ``.train()`` when fine-tuning)."""
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def full_state_dict(self) -> dict[str, Tensor]:
        """State dict of the full timm model (timm key layout), e.g. for a fine-tuned file."""
        return self.model.state_dict()

    # ------------------------------------------------------------ provenance
    def preprocessing(self) -> dict[str, Any]:
        """Input size, normalisation and resize interpolation the weights expect."""
        pre = {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
               "interpolation": self.interpolation}
        resize = (self._meta.get("preprocessing") or {}).get("resize_size", self.spec.resize_size)
        if resize:  # resize to this side, then centre-crop input_size (e.g. Prov-GigaPath 256 -> 224)
            pre["resize_size"] = int(resize)
        return pre

    def provenance(self) -> dict[str, Any]:
        """Plain-data record of what produced the features (stored beside them)."""
        import timm

        r = self._resolved
        prov: dict[str, Any] = {
            "encoder": self.name,
            "timm_model": self.spec.timm_name,
            "weights": self.weights_tag,
            "weights_kind": r.kind,
            "weights_sha256": self.weights_sha256,
            "weights_path": str(r.path.resolve()) if r.path else None,
            "seed": r.seed,
            "levels": list(self.levels),
            "dims": {str(k): v for k, v in self.dims.items()},
            "taps": {str(k): self.spec.taps[k] for k in self.levels},
            **self._runner.provenance(self.levels, self.pooling),
            "preprocessing": self.preprocessing(),
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
        }
        if r.spec is not None and r.spec.citation:
            prov["weights_citation"] = r.spec.citation
        if self._meta:
            prov["finetuned"] = {k: v for k, v in self._meta.items() if k != "preprocessing"}
        return prov

    def extra_repr(self) -> str:
        return (f"name={self.name}, weights={self.weights_tag}, levels={self.levels}, "
                f"pooling={self.pooling}")


def create_encoder(name: str, weights: str = "random", levels: Sequence[int] = (0,), *,
                   seed: int = 0, allow_download: bool = False, strict: bool = True,
                   pooling: str | None = None) -> Encoder:
    """Build encoder *name* with *weights* returning *levels* (see docs/encoders.md).

    *pooling* overrides the spec's default (ViTs: ``cls``, ``mean``, ``cls+mean``).
    The weights file is located before the model is built, so a missing file fails fast.
    Without ``allow_download`` nothing touches the network (hub offline mode inside the call,
    the caller's setting restored after).
    A published model's tag (``uni``, ``virchow2``, ...) builds the authors' exact
    architecture and preprocessing (featstore.encoders.registry.tagged_spec).
    The encoder is returned in eval mode on the CPU, fp32.
    """
    spec = get_spec(name)
    with hub_offline(not allow_download):
        resolved = resolve_weights(spec, weights, seed=seed, allow_download=allow_download)
        spec = tagged_spec(spec, resolved.spec)   # a published model's own kwargs / preprocessing
        import timm  # imported here: listing encoders and failing on a missing file stay fast

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(spec.timm_name, pretrained=False,
                                      **build_kwargs(runner_class(spec).build_kwargs(spec)))
    checkpoint = load_weights(model, spec, resolved, strict=strict)
    encoder = Encoder(spec, model, levels, resolved, checkpoint, pooling=pooling)
    log.debug("created %s weights=%s levels=%s", name, encoder.weights_tag, encoder.levels)
    return encoder.eval()
