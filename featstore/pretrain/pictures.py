"""Pictures of a pretraining run: the loss curve and MAE reconstructions of held-out tiles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


def loss_plot(step_losses: Sequence[float], epoch_losses: Sequence[float], holdout: Sequence[float | None],
              per_epoch: int, path: Path, title: str) -> Path:
    """Training loss per step and per epoch, and the held-out loss before and after."""
    from featstore.core.plotting import new_figure, save

    fig = new_figure(6, 3.5, dpi=120, layout=None)
    ax = fig.subplots()
    ax.plot(np.arange(1, len(step_losses) + 1), step_losses, lw=0.8, alpha=0.5, label="step")
    ax.plot(np.arange(1, len(epoch_losses) + 1) * per_epoch, epoch_losses, "o-", label="epoch mean")
    start, end = holdout
    if start is not None and end is not None:
        ax.plot([0, len(step_losses)], [start, end], "s--", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path, dpi=None)


@torch.no_grad()
def reconstructions(model, tiles: torch.Tensor, normalise: Callable[[torch.Tensor], torch.Tensor],
                    preprocessing: dict, path: Path) -> Path:
    """Rows of held-out tiles: original, the visible 25 %, the reconstruction, reconstruction + visible."""
    from lightly.models import utils

    model.eval()
    x = normalise(tiles)
    _, pred, target, masked = model.reconstruct(x)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    patches = utils.patchify(x, model.patch)
    pixels = (pred.float() * (var + 1e-6).sqrt() + mean).type_as(patches)   # undo the per-patch normalisation
    recon = utils.set_at_index(patches.clone(), masked, pixels)
    hidden = utils.set_at_index(patches.clone(), masked, torch.full_like(target, float("nan")))
    only = utils.set_at_index(torch.full_like(patches, float("nan")), masked, pixels)
    m = torch.tensor(preprocessing["mean"], device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(preprocessing["std"], device=x.device).view(1, 3, 1, 1)

    def image(p: torch.Tensor) -> np.ndarray:
        img = utils.unpatchify(p, model.patch) * s + m
        return np.nan_to_num(img.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy(), nan=0.5)

    cols = [("original", image(patches)), ("visible", image(hidden)), ("reconstructed", image(only)),
            ("reconstructed + visible", image(recon))]
    from featstore.core.plotting import new_figure, save

    fig = new_figure(2.2 * len(cols), 2.2 * len(x), layout=None)
    axes = fig.subplots(len(x), len(cols), squeeze=False)
    for r in range(len(x)):
        for c, (name, imgs) in enumerate(cols):
            axes[r, c].imshow(imgs[r])
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
    fig.tight_layout()
    return save(fig, path, dpi=None)


__all__ = ["loss_plot", "reconstructions"]
