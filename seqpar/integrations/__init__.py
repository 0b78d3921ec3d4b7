"""Bridges to other training stacks: seqpar attention inside megatron-core (``megatron``)."""
