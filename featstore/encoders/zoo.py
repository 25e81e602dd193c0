"""The encoder zoo: ResNet, DenseNet and EfficientNet entries, registered at import.

Levels follow timm's ``feature_info`` taps (one per resolution), deepest first; EfficientNet
adds its head (``conv_head`` + ``bn2``, the network's final features) as level 0, so that
level 0 is always the embedding of the full network.
"""

from __future__ import annotations

from featstore.encoders.papers import CIGA_SIMCLR, KANG_BT, mormont_mtdp
from featstore.encoders.registry import EncoderSpec, WeightsSpec, register_encoder

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
