"""Histopathology weights from the papers, as named weight tags.

The user supplies the file (we never redistribute it); the loader maps the authors' key
layout onto timm's. What each layout looks like, and how it was checked, is written in
docs/encoders.md ("Paper weights").
"""

from __future__ import annotations

from featstore.encoders.registry import WeightsSpec

LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

# Ciga, Xu & Martel, "Self supervised contrastive learning for digital histopathology",
# Machine Learning with Applications 7 (2022), arXiv:2011.13971. SimCLR ResNet18.
# Layout: {"state_dict": {"model.resnet.<torchvision key>": ...}} plus the projection head
# "model.resnet.fc.{1,3}.*" (dropped: a classifier head is never used).
CIGA_SIMCLR = WeightsSpec(
    tag="ciga-simclr",
    files=("pytorchnative_tenpercent_resnet18.ckpt",),
    urls=(
        "https://github.com/ozanciga/self-supervised-histopathology/releases/download/"
        "nativetenpercent/pytorchnative_tenpercent_resnet18.ckpt",
    ),
    citation="Ciga, Xu & Martel, Machine Learning with Applications 7, 2022 (arXiv:2011.13971)",
    source="github.com/ozanciga/self-supervised-histopathology, release 'nativetenpercent'",
    note="use the native checkpoint; the Lightning one (tenpercent_resnet18.ckpt) pickles code",
)


def mormont_mtdp(arch: str) -> WeightsSpec:
    """Mormont, Geurts & Marée, "Multi-task pre-training of deep neural networks for digital
    pathology", IEEE JBHI 25(2), 2021. Layout: a MultiHead state dict, ``features.<torchvision
    key>`` for the shared network plus ``heads.<task>.*`` (dropped)."""
    files = {
        "resnet50": ("resnet50-mh-best-191205-141200.pth",
                     "https://dox.uliege.be/index.php/s/kvABLtVuMxW8iJy/download"),
        "densenet121": ("densenet121-mh-best-191205-141200.pth",
                        "https://dox.uliege.be/index.php/s/G72InP4xmJvOrVp/download"),
    }[arch]
    return WeightsSpec(
        tag="mormont-mtdp",
        files=(files[0],),
        urls=(files[1],),
        drop_prefixes=("heads.",),
        citation="Mormont, Geurts & Marée, IEEE JBHI 25(2), 2021",
        source="github.com/waliens/multitask-dipath (README 'Raw model files')",
    )


# Kang et al., "Benchmarking Self-Supervised Learning on Diverse Pathology Datasets", CVPR 2023.
# Layout: a plain torchvision ResNet50 state dict with "fc.*" removed (ResNetTrunk).
KANG_BT = WeightsSpec(
    tag="kang-bt",
    files=("bt_rn50_ep200.torch",),
    urls=(
        "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/"
        "pretrained-weights/bt_rn50_ep200.torch",
    ),
    mean=LUNIT_MEAN,
    std=LUNIT_STD,
    citation="Kang et al., CVPR 2023 (arXiv:2212.04690)",
    source="github.com/lunit-io/benchmark-ssl-pathology, release 'pretrained-weights'",
)
