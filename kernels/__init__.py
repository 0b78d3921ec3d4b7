"""seqpar.kernels: attention compute kernels: the torch reference (the oracle) and Triton (GPU).

Imports torch and triton only; never the seqpar core or seqpar.parallel.
"""

from seqpar.kernels.autograd import block_attention, varlen_attention
from seqpar.kernels.dispatch import resolve_impl
from seqpar.kernels.reference import block_attn_bwd, block_attn_fwd, merge
from seqpar.kernels.varlen import doc_ids_and_positions

__all__ = [
    "block_attn_fwd",
    "block_attn_bwd",
    "merge",
    "block_attention",
    "varlen_attention",
    "doc_ids_and_positions",
    "resolve_impl",
]
