"""Self-supervised pretraining on a store's own tiles (`featstore pretrain`, docs/pretrain.md)."""

from featstore.pretrain.config import PretrainConfig
from featstore.pretrain.methods import METHODS
from featstore.pretrain.run import PretrainResult, pretrain

__all__ = ["METHODS", "PretrainConfig", "PretrainResult", "pretrain"]
