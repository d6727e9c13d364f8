"""codelen: how much two datasets share, measured by compressing them with a language model."""

__version__ = "0.1.0"
