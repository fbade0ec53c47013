"""ralis-gym: region-based active learning for semantic segmentation (RALIS, ICLR 2020)."""

__version__ = "0.1.0"
