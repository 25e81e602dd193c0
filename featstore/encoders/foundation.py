"""Published pathology foundation models as weight tags of the ViT entries, offline.

Each tag is a :class:`WeightsSpec` beside the registry entry whose architecture it shares
(featstore.encoders.zoo). Where the authors' network differs from the plain entry
(LayerScale, register tokens, SwiGLU, depth / width, patch size), the tag carries the exact
timm kwargs; it also carries the authors' preprocessing and pooling, and the key layout of
their checkpoint (``layout``, mapped by featstore.encoders.weights);
featstore.encoders.registry.tagged_spec makes the spec a tagged model is built, run and
recorded with. The user supplies the files (most
are gated on Hugging Face); nothing is downloaded. Facts and sources: docs/encoders.md,
"Foundation-model weights".
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from featstore.encoders.papers import LUNIT_MEAN, LUNIT_STD
from featstore.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, WeightsSpec

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_HF_GATED = "gated on Hugging Face: accept the terms on huggingface.co/{}, then download it there"


def _hf(tag: str, repo: str, citation: str, licence: str, **kw: Any) -> WeightsSpec:
    """A tag whose file is ``TAG.safetensors`` / ``TAG.bin`` in a weights directory, else the
    Hugging Face repo's cached ``model.safetensors`` / ``pytorch_model.bin``."""
    return WeightsSpec(tag=tag, files=(f"{tag}.safetensors", f"{tag}.bin"), hf_repo=repo,
                       citation=citation, licence=licence, source=f"huggingface.co/{repo}", **kw)


UNI = _hf(
    "uni", "MahmoodLab/UNI",
    "Chen et al., Towards a general-purpose foundation model for computational pathology, "
    "Nature Medicine 30, 2024",
    "CC-BY-NC-ND 4.0, " + _HF_GATED.format("MahmoodLab/UNI"),
    timm_kwargs={"init_values": 1e-5}, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    interpolation="bilinear", layout="timm")

UNI2_H = _hf(
    "uni2-h", "MahmoodLab/UNI2-h",
    "Chen et al., Nature Medicine 30, 2024 (UNI2-h, MahmoodLab 2025)",
    "CC-BY-NC-ND 4.0, " + _HF_GATED.format("MahmoodLab/UNI2-h"),
    timm_kwargs={"depth": 24, "num_heads": 24, "embed_dim": 1536, "init_values": 1e-5,
                 "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, **_SWIGLU},
    mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", layout="timm",
    note="ViT-g/14 width 1536 but 24 blocks, 8 register tokens, SwiGLU")

VIRCHOW2 = _hf(
    "virchow2", "paige-ai/Virchow2",
    "Zimmermann et al., Virchow2: scaling self-supervised mixed magnification models in "
    "pathology, arXiv:2408.00738",
    "CC-BY-NC-ND 4.0, " + _HF_GATED.format("paige-ai/Virchow2"),
    timm_kwargs={"init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, **_SWIGLU},
    mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls+mean", layout="timm",
    note="the authors' embedding is CLS concatenated with the mean of the patch tokens (2,560-d)")


def _hoptimus(tag: str, repo: str, licence: str) -> WeightsSpec:
    return _hf(tag, repo, f"Saillard et al., {tag}, Bioptimus 2024 (github.com/bioptimus/releases)",
               licence, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, layout="timm")


H_OPTIMUS_0 = _hoptimus("h-optimus-0", "bioptimus/H-optimus-0",
                        "Apache-2.0; download from huggingface.co/bioptimus/H-optimus-0")
H_OPTIMUS_1 = _hoptimus("h-optimus-1", "bioptimus/H-optimus-1",
                        "non-commercial, " + _HF_GATED.format("bioptimus/H-optimus-1"))

GIGAPATH = _hf(
    "prov-gigapath", "prov-gigapath/prov-gigapath",
    "Xu et al., A whole-slide foundation model for digital pathology from real-world data, "
    "Nature 630, 2024",
    "Prov-GigaPath licence (research, non-commercial), " + _HF_GATED.format("prov-gigapath/prov-gigapath"),
    timm_kwargs={"patch_size": 16, "reg_tokens": 0, "no_embed_class": False},
    mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_size=256, interpolation="bicubic", layout="timm",
    note="tile encoder: ViT-g with 16 px patches, no registers; resize 256 then centre-crop 224")

PHIKON = _hf(
    "phikon", "owkin/phikon",
    "Filiot et al., Scaling self-supervised learning for histopathology with masked image "
    "modeling, medRxiv 2023.07.21.23292757",
    "Owkin non-commercial licence; download from huggingface.co/owkin/phikon",
    timm_kwargs={"norm_eps": 1e-12}, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    interpolation="bilinear", layout="hf-vit",
    note="transformers ViTModel layout (query/key/value fused to qkv); the pooler is dropped")

PHIKON_V2 = _hf(
    "phikon-v2", "owkin/phikon-v2",
    "Filiot et al., Phikon-v2, a large and public feature extractor for biomarker prediction, "
    "arXiv:2409.09173",
    "Owkin non-commercial licence; download from huggingface.co/owkin/phikon-v2",
    timm_kwargs={"init_values": 1e-5}, mean=IMAGENET_MEAN, std=IMAGENET_STD, layout="hf-vit",
    note="transformers Dinov2Model layout (LayerScale lambda1 -> ls.gamma); the position "
         "embedding is resampled to 224 px if the file's grid differs")


def _kaiko(tag: str, timm_name: str, **kw: Any) -> WeightsSpec:
    """kaiko.ai's TCGA models; the model cards resize with torchvision's default (bilinear)."""
    repo = f"1aurent/{timm_name}.kaiko_ai_towards_large_pathology_fms"
    return _hf(tag, repo, "kaiko.ai et al., Towards large-scale training of pathology foundation "
               "models, arXiv:2404.15217", f"kaiko non-commercial licence; download from "
               f"huggingface.co/{repo} (or torch.hub kaiko-ai/towards_large_pathology_fms)",
               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", layout="timm", **kw)


KAIKO_S16 = _kaiko("kaiko-s16", "vit_small_patch16_224")
KAIKO_B16 = _kaiko("kaiko-b16", "vit_base_patch16_224")
KAIKO_L14 = _kaiko("kaiko-l14", "vit_large_patch14_reg4_224",
                   note="DINOv2 ViT-L/14 with 4 registers and LayerScale, at 224 px")

LUNIT_DINO_S16 = WeightsSpec(
    tag="lunit-dino",
    files=("dino_vit_small_patch16_ep200.torch",),
    urls=("https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/"
          "pretrained-weights/dino_vit_small_patch16_ep200.torch",),
    mean=LUNIT_MEAN, std=LUNIT_STD, layout="timm",
    citation="Kang et al., Benchmarking self-supervised learning on diverse pathology datasets, "
             "CVPR 2023 (arXiv:2212.04690)",
    source="github.com/lunit-io/benchmark-ssl-pathology, release 'pretrained-weights'",
    licence="see the repository (public release); a plain timm ViT-S/16 state dict",
)

FOUNDATION_TAGS: tuple[WeightsSpec, ...] = (
    UNI, UNI2_H, VIRCHOW2, H_OPTIMUS_0, H_OPTIMUS_1, GIGAPATH, PHIKON, PHIKON_V2,
    KAIKO_S16, KAIKO_B16, KAIKO_L14, LUNIT_DINO_S16)

def build_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` kwargs with plain-data ``norm_eps`` made a LayerNorm class
    (transformers' ViT uses eps 1e-12 where timm uses 1e-6)."""
    kw = dict(kwargs)
    eps = kw.pop("norm_eps", None)
    if eps is not None:
        kw["norm_layer"] = partial(nn.LayerNorm, eps=float(eps))
    return kw


__all__ = ["FOUNDATION_TAGS", "HOPTIMUS_MEAN", "HOPTIMUS_STD", "build_kwargs"]
