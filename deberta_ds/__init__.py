"""deberta_ds: DeBERTaV3 pre-training on DeepSpeed."""

__version__ = "0.1.0"
