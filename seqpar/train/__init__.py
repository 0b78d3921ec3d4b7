"""Training: the loop, batches, optimizer, metrics. Entry point: ``python -m seqpar.train``."""
