"""Models that route through dmoe: the reference byte-level transformer, the byte corpus it trains on, and the
Hugging Face MoE families (`models.hf_families`, the one table of how each names and stores its experts).

Names are imported on first use (PEP 562), so that a peer reading only the family table never imports the
router client that the reference model needs.
"""

from importlib import import_module

_EXPORTS = {
    "VOCAB_SIZE": "models.corpus",
    "load_corpus": "models.corpus",
    "sample_batch": "models.corpus",
    "split_train_val": "models.corpus",
    "Block": "models.reference",
    "CausalSelfAttention": "models.reference",
    "CharTransformer": "models.reference",
    "ModelConfig": "models.reference",
    "default_ffn_factory": "models.reference",
    "local_ffn": "models.reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
