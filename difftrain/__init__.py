"""difftrain: training large diffusion models on clusters."""
__version__ = "0.1.0"
