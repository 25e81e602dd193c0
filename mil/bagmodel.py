"""The fine-tuned model: a truncated encoder in front of a MIL head, trained one bag of tiles at a time.

* a bag of k tiles is embedded in micro-batches under ``torch.utils.checkpoint``: activations of
  one micro-batch live at a time, and the gradient is exactly that of the whole bag (the head
  needs all k embeddings for its softmax);
* BatchNorm layers stay in eval mode (running statistics frozen; their affine weights train);
* only the encoder stages the level runs receive gradients, or only the last N of them
  (``train_blocks``; the frozen prefix then runs without autograd); encoder and head have their
  own learning rates.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mil.config import FinetuneConfig
from mil.errors import MilError
from mil.parent import Parent, parent_encoder


class BagModel(nn.Module):
    """The truncated encoder in front of the MIL head: tiles (B, 3, S, S) -> (logits, raw attention)."""

    def __init__(self, encoder, head: nn.Module, level: int, precision: str = "fp32",
                 micro_batch: int = 16):
        super().__init__()
        encoder.set_levels((int(level),))
        self.encoder, self.head = encoder, head
        self.level = int(level)
        self.precision = precision
        self.micro_batch = int(micro_batch)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def _embed_chunk(self, x: Tensor) -> Tensor:
        from featstore.encoders import autocast

        with autocast(self.precision, x.device):
            return self.encoder(x)[self.level].float()

    def embed(self, x: Tensor) -> Tensor:
        """(B, D) float32 embeddings, *micro_batch* tiles per forward.

        With gradients on, each micro-batch is checkpointed: its activations are recomputed in
        the backward pass instead of kept, so a bag of any k fits in memory and the gradient is
        exactly that of one forward over the whole bag.
        """
        x = x.to(self.device, non_blocking=self.device.type == "cuda")
        chunks = [x[i:i + self.micro_batch] for i in range(0, len(x), self.micro_batch)]
        if torch.is_grad_enabled() and len(chunks) > 1:
            outs = [checkpoint(self._embed_chunk, c, use_reentrant=False) for c in chunks]
        else:
            outs = [self._embed_chunk(c) for c in chunks]
        return torch.cat(outs) if outs else torch.zeros((0, self.encoder.dims[self.level]), device=self.device)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.head(self.embed(x))

    def train_mode(self) -> "BagModel":
        """Training mode with every BatchNorm kept in eval mode (running statistics frozen)."""
        self.train()
        self.encoder.set_batchnorm_eval()
        return self


def build_model(parent: Parent, cfg: FinetuneConfig, device: torch.device, precision: str) -> BagModel:
    """The parent run's encoder + its fold's head; only the stages the level runs (or the last
    ``cfg.train_blocks`` of them) can receive gradients."""
    from featstore.encoders import prepare_encoder
    from featstore.errors import EncoderError

    enc = parent_encoder(parent.run)
    enc = prepare_encoder(enc, precision, device)
    head = parent.run.model(parent.fold).to(device)
    model = BagModel(enc, head, int(parent.run.config["minus"]), precision, cfg.micro_batch)
    try:
        enc.set_trainable(cfg.train_blocks)
    except EncoderError as exc:
        raise MilError(f"--train-blocks {cfg.train_blocks}: {exc}") from None
    return model


def make_optimizer(model: BagModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """Adam with two groups: the encoder's trainable parameters (``lr``) and the head (``head_lr``)."""
    enc = model.encoder
    groups = [{"params": [p for p in enc.trainable_parameters(enc.train_last) if p.requires_grad], "lr": cfg.lr},
              {"params": list(model.head.parameters()), "lr": cfg.head_lr}]
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)


def backward_bag(model: BagModel, x: Tensor, target: int, scale: float = 1.0) -> float:
    """Cross-entropy of one bag, backpropagated (scaled for accumulation); returns the loss."""
    logits, _ = model(x)
    t = torch.tensor([int(target)], device=logits.device)
    loss = nn.functional.cross_entropy(logits.float().unsqueeze(0), t)
    (loss * scale).backward()
    return float(loss.detach())


def train_step(model: BagModel, optimizer: torch.optim.Optimizer, x: Tensor, target: int) -> float:
    """One optimiser step on one bag (BatchNorm statistics untouched)."""
    model.train_mode()
    optimizer.zero_grad(set_to_none=True)
    loss = backward_bag(model, x, target)
    optimizer.step()
    return loss


@torch.no_grad()
def embed_slides(model: BagModel, tiles, items: Sequence[tuple[str, np.ndarray]], batch: int,
                 on_batch: Callable[[], None] | None = None) -> dict[str, Tensor]:
    """{slide_id: (N, D)} embeddings of the given rows of each slide, read from *tiles*
    (a :class:`featstore.read.tilesource.TileSource`) *batch* tiles at a time."""
    model.eval()
    chunks = [(sid, c[i:i + batch]) for sid, c in items for i in range(0, len(c), batch)]
    parts: dict[str, list[Tensor]] = {sid: [] for sid, _ in items}
    for sid, x in tiles.stream(chunks):
        parts[sid].append(model.embed(x))
        if on_batch is not None:
            on_batch()
    return {sid: torch.cat(v) for sid, v in parts.items() if v}


__all__ = ["BagModel", "build_model", "make_optimizer", "backward_bag", "train_step", "embed_slides"]
