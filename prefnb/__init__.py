"""prefnb: losses, one training loop and evaluation for a notebook-first SFT/DPO study."""

__version__ = "0.1.0"
