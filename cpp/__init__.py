"""cpp: image clustering and self-labeling via the principle of rate reduction."""

__version__ = "0.1.0"
