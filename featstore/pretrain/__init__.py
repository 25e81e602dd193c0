"""Self-supervised pretraining on a store's own tiles (`featstore pretrain`, docs/pretrain.md).

The config is imported at once (the CLI builds its options from it); the methods and the
training loop, which need torch, are imported on first use so that `featstore ls` starts fast."""

from featstore.pretrain.config import PretrainConfig

__all__ = ["METHODS", "PretrainConfig", "PretrainResult", "pretrain"]


def __getattr__(name: str):
    if name == "METHODS":
        from featstore.pretrain.methods import METHODS

        return METHODS
    if name in ("PretrainResult", "pretrain"):
        from featstore.pretrain import run

        return getattr(run, name)
    raise AttributeError(f"module 'featstore.pretrain' has no attribute {name!r}")
