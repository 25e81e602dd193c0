"""Self-supervised methods, a registry: ``mae`` (ViTs), ``simclr`` and ``barlowtwins`` (any encoder).

Both come from lightly (LightlySSL), a maintained SSL library: its masked ViT wrapper and MAE
decoder for timm ViTs, its SimCLR projection head and NT-Xent loss, rather than our own copies
of them. Each method wraps the featstore :class:`Encoder` it trains in place, so
``save_encoder`` afterwards writes the pretrained weights in the registry's layout.

- **MAE** (He et al. 2022): mask ``mask_ratio`` of the patch tokens (prefix tokens -- CLS and
  registers -- always kept), encode the visible ones with the ViT, reconstruct the masked
  patches with a light decoder; loss = MSE on per-patch normalised pixels (the paper's
  ``norm_pix_loss``).
- **SimCLR** (Chen et al. 2020; Ciga et al. 2022 on pathology): two augmented views per tile,
  the encoder's final-level embedding, a 2-layer projection head, NT-Xent loss.
- **Barlow Twins** (Zbontar et al. 2021; Kang et al. 2023 on pathology): the same two views,
  a 3-layer projector, the cross-correlation loss (lightly's ``BarlowTwinsLoss``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from featstore.errors import PretrainError

METHODS: dict[str, type["Method"]] = {}
BARLOW_DIM = 1024   # Barlow Twins projector width (the paper's 8192 costs more than the encoder on a CPU)


def register_method(cls: type["Method"]) -> type["Method"]:
    METHODS[cls.name] = cls
    return cls


def _vit_of(encoder) -> Any:
    from timm.models.vision_transformer import VisionTransformer

    return encoder.model if isinstance(encoder.model, VisionTransformer) else None


def method_for(name: str, encoder) -> str:
    """The method a run uses: *name*, or for ``auto`` mae on ViTs and simclr otherwise."""
    if name == "auto":
        return "mae" if _vit_of(encoder) is not None else "simclr"
    if name not in METHODS:
        raise PretrainError(f"--method {name!r}: use auto, {', '.join(METHODS)}")
    return name


class Method(nn.Module):
    """A trainable wrapper: ``loss(views)`` for one step; ``views`` augmented copies per tile."""

    name = ""
    views = 1
    augmentation = "mae"

    def loss(self, views: list[Tensor]) -> Tensor:
        raise NotImplementedError


@register_method
class MAE(Method):
    name = "mae"
    views = 1
    augmentation = "mae"

    def __init__(self, encoder, cfg) -> None:
        super().__init__()
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM

        vit = _vit_of(encoder)
        if vit is None:
            raise PretrainError(f"--method mae needs a ViT encoder; {encoder.name} is not one (use --method simclr)")
        # "skip": keep the encoder's own weights and position embedding (random init or a tag)
        self.backbone = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip",
                                                    pos_embed_initialization="skip")
        self.patch = int(vit.patch_embed.patch_size[0])
        self.prefix = int(vit.num_prefix_tokens)
        self.ratio = float(cfg.mask_ratio)
        self.decoder_embed = nn.Linear(vit.embed_dim, cfg.decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=cfg.decoder_dim, depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads, num_prefix_tokens=self.prefix)
        self.predict = nn.Linear(cfg.decoder_dim, self.patch * self.patch * 3)

    def masks(self, batch: int, seq: int, device) -> tuple[Tensor, Tensor]:
        """(kept, masked) token indices; the prefix tokens are always kept."""
        noise = torch.rand(batch, seq, device=device)
        noise[:, :self.prefix] = -1.0
        keep = self.prefix + int((seq - self.prefix) * (1.0 - self.ratio))
        order = torch.argsort(noise, dim=1)
        return order[:, :keep], order[:, keep:]

    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss, predicted masked patches, their targets, masked patch indices)."""
        from lightly.models import utils

        b = images.shape[0]
        seq = self.prefix + (images.shape[-1] // self.patch) * (images.shape[-2] // self.patch)
        keep, masked = self.masks(b, seq, images.device)
        encoded = self.backbone.encode(images=images, idx_keep=keep)
        tokens = utils.repeat_token(self.decoder.mask_token, (b, seq))    # the full sequence, masks in place
        tokens = utils.set_at_index(tokens, keep, self.decoder_embed(encoded).type_as(tokens))
        decoded = self.decoder(tokens)
        pred = self.predict(utils.get_at_index(decoded, masked))
        target = utils.get_at_index(utils.patchify(images, self.patch), masked - self.prefix)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        norm = (target - mean) / (var + 1e-6).sqrt()
        return nn.functional.mse_loss(pred.float(), norm.float()), pred, target, masked - self.prefix

    def loss(self, views: list[Tensor]) -> Tensor:
        return self.reconstruct(views[0])[0]


@register_method
class SimCLR(Method):
    name = "simclr"
    views = 2
    augmentation = "simclr"

    def __init__(self, encoder, cfg) -> None:
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import SimCLRProjectionHead

        self.encoder = encoder
        dim = int(encoder.dims[0])
        self.head = SimCLRProjectionHead(dim, dim, 128)
        self.criterion = NTXentLoss(temperature=float(cfg.temperature))

    def embed(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x)[0].float())

    def loss(self, views: list[Tensor]) -> Tensor:
        return self.criterion(self.embed(views[0]), self.embed(views[1]))


@register_method
class BarlowTwins(SimCLR):
    """Barlow Twins (Zbontar et al. 2021; Kang et al. 2023 benchmarked it on pathology): the
    cross-correlation of two views' projections pushed to the identity. The redundancy term
    keeps every projected dimension informative, which suits short runs and small batches."""

    name = "barlowtwins"

    def __init__(self, encoder, cfg) -> None:
        Method.__init__(self)
        from lightly.loss import BarlowTwinsLoss
        from lightly.models.modules.heads import BarlowTwinsProjectionHead

        self.encoder = encoder
        dim = int(encoder.dims[0])
        self.head = BarlowTwinsProjectionHead(dim, BARLOW_DIM, BARLOW_DIM)
        self.criterion = BarlowTwinsLoss()


def build_method(name: str, encoder, cfg) -> Method:
    """The registered method *name* around *encoder* (levels set to the final one)."""
    encoder.set_levels((0,))
    return METHODS[name](encoder, cfg)

__all__ = ["METHODS", "MAE", "BarlowTwins", "Method", "SimCLR", "build_method", "method_for", "register_method"]
