"""mauctl: MoCo pretraining with the alignment and uniformity losses of Wang & Isola (ICML 2020)."""

__version__ = "0.1.0"
