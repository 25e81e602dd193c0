"""The encoder zoo: ResNet, DenseNet, EfficientNet and ViT / DINOv2 entries, registered at import.

CNN levels follow timm's ``feature_info`` taps (one per resolution), deepest first;
EfficientNet adds its head (``conv_head`` + ``bn2``, the network's final features) as level 0,
so that level 0 is always the embedding of the full network. ViT levels are blocks: minus K
= block ``depth-1-K`` (featstore.encoders.vit); ``--minus all`` = every 4th block from the last.
"""

from __future__ import annotations

from featstore.encoders import foundation as fm
from featstore.encoders.papers import CIGA_SIMCLR, KANG_BT, mormont_mtdp
from featstore.encoders.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIT_ALL_STRIDE,
    EncoderSpec,
    WeightsSpec,
    block_levels,
    register_encoder,
)

_TV = "https://download.pytorch.org/models/"


def _imagenet_tv(name: str, tv_file: str | None) -> WeightsSpec:
    files = (tv_file,) if tv_file else ()
    return WeightsSpec(
        tag="imagenet",
        files=files,
        urls=tuple(_TV + f for f in files),
        hf_repo=f"timm/{name}.tv_in1k",
        citation="torchvision ImageNet-1k weights (IMAGENET1K_V1)",
        source="download.pytorch.org/models or huggingface.co/timm",
    )


def _resnet(name: str, dims: tuple[int, int, int, int], tv_file: str, *extra: WeightsSpec):
    weights = {w.tag: w for w in (_imagenet_tv(name, tv_file), *extra)}
    return register_encoder(EncoderSpec(
        name=name, timm_name=name, family="resnet",
        steps=("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
        taps=("layer4", "layer3", "layer2", "layer1", "act1"),
        dims=(*dims, 64),
        interpolation="bilinear", head_prefixes=("fc.",), weights=weights,
        description=f"{name}: minus K = output of layer(4-K); level 4 = stem (conv1+bn1+relu)",
    ))


def _densenet(name: str, dims: tuple[int, int, int, int], tv_file: str, *extra: WeightsSpec):
    weights = {w.tag: w for w in (_imagenet_tv(name, tv_file), *extra)}
    steps = ("conv0", "norm0", "pool0", "denseblock1", "transition1", "denseblock2",
             "transition2", "denseblock3", "transition3", "denseblock4", "norm5")
    return register_encoder(EncoderSpec(
        name=name, timm_name=name, family="densenet",
        steps=tuple(f"features.{s}" for s in steps),
        taps=tuple(f"features.{s}" for s in
                   ("norm5", "denseblock3", "denseblock2", "denseblock1", "norm0")),
        dims=(*dims, 64),
        interpolation="bilinear", head_prefixes=("classifier.",), weights=weights,
        description=f"{name}: minus0 = norm5+ReLU, minus K = denseblock(4-K) output",
    ))


_EFFNET_HF = {"efficientnet_b0": "ra_in1k", "efficientnet_b1": "ft_in1k",
              "efficientnet_b2": "ra_in1k", "efficientnet_b3": "ra2_in1k"}


def _efficientnet(name: str, dims: tuple[int, ...], input_size: int):
    imagenet = WeightsSpec(
        tag="imagenet", hf_repo=f"timm/{name}.{_EFFNET_HF[name]}",
        citation=f"timm ImageNet-1k weights ({name}.{_EFFNET_HF[name]})",
        source="huggingface.co/timm",
    )
    return register_encoder(EncoderSpec(
        name=name, timm_name=name, family="efficientnet",
        steps=("conv_stem", "bn1", *(f"blocks.{i}" for i in range(7)), "conv_head", "bn2"),
        taps=("bn2", "blocks.6", "blocks.4", "blocks.2", "blocks.1", "blocks.0"),
        dims=dims, input_size=input_size,
        interpolation="bicubic", head_prefixes=("classifier.",), weights={"imagenet": imagenet},
        description=f"{name}: minus0 = head (conv_head+bn2+SiLU), then the stride taps",
    ))


_resnet("resnet18", (512, 256, 128, 64), "resnet18-f37072fd.pth", CIGA_SIMCLR)
_resnet("resnet34", (512, 256, 128, 64), "resnet34-b627a593.pth")
_resnet("resnet50", (2048, 1024, 512, 256), "resnet50-0676ba61.pth",
        mormont_mtdp("resnet50"), KANG_BT)
_densenet("densenet121", (1024, 1024, 512, 256), "densenet121-a639ec97.pth",
          mormont_mtdp("densenet121"))
_densenet("densenet169", (1664, 1280, 512, 256), "densenet169-b2777c0a.pth")
_efficientnet("efficientnet_b0", (1280, 320, 112, 40, 24, 16), 224)
_efficientnet("efficientnet_b1", (1280, 320, 112, 40, 24, 16), 224)
_efficientnet("efficientnet_b2", (1408, 352, 120, 48, 24, 16), 256)
_efficientnet("efficientnet_b3", (1536, 384, 136, 48, 32, 24), 288)


# --------------------------------------------------------------------------- transformers
# Common to every ViT entry: no classifier head (features only) and any input size (the
# position embedding is resampled by timm when the input is not the native 224 px).
_VIT_BASE = {"num_classes": 0, "dynamic_img_size": True}
# DINOv2 with registers (Darcet et al. 2024): LayerScale, 4 register tokens, position embedding
# for patch tokens only. Built at 224 px (16x16 patches), as the pathology models on this
# architecture (UNI2, Virchow2, H-optimus) are; timm's native DINOv2 size is 518.
_DINOV2 = {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True}


def _vit(name: str, family: str, depth: int, dim: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
         kwargs: dict | None = None, note: str = "", weights: tuple[WeightsSpec, ...] = ()
         ) -> EncoderSpec:
    return register_encoder(EncoderSpec(
        name=name, timm_name=name, family=family,
        **block_levels(depth, dim, VIT_ALL_STRIDE),
        mean=mean, std=std, interpolation="bicubic", head_prefixes=("head.",),
        pooling="cls", weights={w.tag: w for w in weights},
        timm_kwargs={**_VIT_BASE, **(kwargs or {})},
        description=f"{name}: {depth} blocks x {dim}; minus K = block {depth - 1}-K + final norm, "
                    f"CLS pooled{note}",
    ))


_HALF = (0.5, 0.5, 0.5)       # timm's augreg ViT-S/B/L weights normalise with 0.5 / 0.5
# Published pathology weights are tags of the entry whose architecture they share
# (featstore.encoders.foundation); a tag's own kwargs / preprocessing override the entry's.
_vit("vit_small_patch16_224", "vit", 12, 384, mean=_HALF, std=_HALF,
     weights=(fm.KAIKO_S16, fm.LUNIT_DINO_S16))
_vit("vit_base_patch16_224", "vit", 12, 768, mean=_HALF, std=_HALF,
     weights=(fm.KAIKO_B16, fm.PHIKON))
_vit("vit_large_patch16_224", "vit", 24, 1024, mean=_HALF, std=_HALF,
     weights=(fm.UNI, fm.PHIKON_V2))
_vit("vit_huge_patch14_224", "vit", 32, 1280, weights=(fm.VIRCHOW2,))
_vit("vit_giant_patch14_224", "vit", 40, 1408, weights=(fm.UNI2_H,))
_vit("vit_small_patch14_reg4_dinov2", "dinov2", 12, 384, kwargs=_DINOV2, note="; 4 registers")
_vit("vit_base_patch14_reg4_dinov2", "dinov2", 12, 768, kwargs=_DINOV2, note="; 4 registers")
_vit("vit_large_patch14_reg4_dinov2", "dinov2", 24, 1024, kwargs=_DINOV2, note="; 4 registers",
     weights=(fm.KAIKO_L14,))
_vit("vit_giant_patch14_reg4_dinov2", "dinov2", 40, 1536, note="; 4 registers, SwiGLU",
     kwargs={**_DINOV2, "mlp_ratio": 2.66667 * 2, "mlp_layer": "swiglu_packed", "act_layer": "silu"},
     weights=(fm.H_OPTIMUS_0, fm.H_OPTIMUS_1, fm.GIGAPATH))
