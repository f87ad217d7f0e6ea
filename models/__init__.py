"""Models that route through dmoe: the reference byte-level transformer and the byte corpus it trains on."""

from models.corpus import VOCAB_SIZE, load_corpus, sample_batch, split_train_val
from models.reference import Block, CausalSelfAttention, CharTransformer, ModelConfig, default_ffn_factory, local_ffn

__all__ = [
    "VOCAB_SIZE",
    "Block",
    "CausalSelfAttention",
    "CharTransformer",
    "ModelConfig",
    "default_ffn_factory",
    "load_corpus",
    "local_ffn",
    "sample_batch",
    "split_train_val",
]
