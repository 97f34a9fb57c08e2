"""influcoder: training-data attribution for language models, distilled into a fast encoder."""

__version__ = "0.1.0"
