"""iv2_lightning: the InternVideo2 recipe (arXiv 2403.15377) as PyTorch Lightning components.

The pure-PyTorch model parts live in :mod:`iv2_lightning.models` and import without Lightning.
"""

__version__ = "0.1.0"
