"""Segmentation models whose encoder is a registry encoder: U-Net and U-Net++ decoders from
segmentation_models_pytorch (its ``tu-<timm name>`` universal encoder), initialised from any
weights tag the registry resolves (random, ImageNet, a paper's, a `featstore pretrain` output, a
fine-tuned ``encoder.pt``).

The registry builds the timm model with its weights (:func:`featstore.create_encoder`), and its
state dict is copied into smp's feature extractor key by key: smp's ``features_only`` model is
the same timm model minus its head, with nested names sometimes flattened
(``features.denseblock1`` -> ``features_denseblock1``). Every key must map, with the same shape;
otherwise the build fails naming the keys, so an encoder never silently starts from random.
Decoders are registered by name (:data:`ARCHITECTURES`), as timm's ``create_model`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mil.seg.errors import SegError

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str):
    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = fn
        return fn
    return add


@register_architecture("unet")
def _unet(encoder_name: str, classes: int, **kw) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name, encoder_weights=None, classes=classes, **kw)


@register_architecture("unetplusplus")
def _unetplusplus(encoder_name: str, classes: int, **kw) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.UnetPlusPlus(encoder_name, encoder_weights=None, classes=classes, **kw)


def _source_key(key: str, source: Mapping[str, torch.Tensor]) -> str | None:
    """The full timm model's key for a key of smp's features-only model, or None."""
    for cand in (key, key.replace("_", ".", 1)):
        if cand in source:
            return cand
    return None


def map_encoder_state(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
                      what: str) -> dict[str, torch.Tensor]:
    """*target*'s keys filled from *source* (the full timm state dict); :class:`SegError` if any
    key has no counterpart or a different shape."""
    out, missing = {}, []
    for key, value in target.items():
        src = _source_key(key, source)
        if src is None or tuple(source[src].shape) != tuple(value.shape):
            missing.append(key)
            continue
        out[key] = source[src]
    if missing:
        raise SegError(f"{what}: {len(missing)} encoder weights have no counterpart in the registry's model "
                       f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    return out


def build_segmenter(arch: str, encoder: str, weights: str = "random", *, classes: int = 2, seed: int = 0,
                    **kw: Any) -> tuple[nn.Module, Any]:
    """(model, registry encoder): decoder *arch* on *encoder* with *weights*; the registry
    encoder (its provenance, preprocessing, weights tag) comes back beside the model."""
    from featstore import create_encoder

    if arch not in ARCHITECTURES:
        raise SegError(f"--arch {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    enc = create_encoder(encoder, weights, levels=(0,), seed=seed)
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(enc.model, VisionTransformer):
        raise SegError(f"{encoder}: ViT encoders have no U-Net decoder here (no feature pyramid); use a CNN")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)        # the decoder's init
        model = ARCHITECTURES[arch](f"tu-{enc.spec.timm_name}", classes, **kw)
    features = model.encoder.model
    state = map_encoder_state(features.state_dict(), enc.full_state_dict(), f"{encoder} ({enc.weights_tag})")
    features.load_state_dict(state, strict=True)
    return model, enc


__all__ = ["ARCHITECTURES", "build_segmenter", "map_encoder_state", "register_architecture"]
