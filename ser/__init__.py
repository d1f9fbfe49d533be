"""ser: Self-Evolved Reward Learning (Huang et al., ICLR 2025) — reward models from few human labels."""

__version__ = "0.1.0"
