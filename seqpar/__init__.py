"""seqpar: distributed long-sequence training.

Kept light on purpose: importing ``seqpar`` loads no torch model, trainer or data code,
so leaves such as ``seqpar.kernels`` or ``seqpar.config`` can be imported alone.
"""

__version__ = "0.1.0"
