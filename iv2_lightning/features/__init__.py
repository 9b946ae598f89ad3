"""Text and audio input features that ``data/`` and ``models/`` share: tokenizers and kaldi fbank.

A package of its own so that imports run one way: ``data/`` and ``models/`` both import it, and it
imports neither (checked by ``tests/test_layering.py``).
"""

from iv2_lightning.features.fbank import FBANK_MEAN, FBANK_STD, SAMPLE_RATE, compute_fbank
from iv2_lightning.features.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    Padding,
    TokenizedText,
    build_tokenizer,
)

__all__ = [
    "FBANK_MEAN",
    "FBANK_STD",
    "SAMPLE_RATE",
    "ByteTokenizer",
    "HFTokenizer",
    "Padding",
    "TokenizedText",
    "build_tokenizer",
    "compute_fbank",
]
