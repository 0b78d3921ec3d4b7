import numpy as np
import torch

from seqpar.train.batch import IGNORE, make_microbatch, shift_labels


def test_labels_shift_within_documents_only():
    tokens = np.arange(10, 17)
    labels = shift_labels(tokens, np.array([0, 3, 4, 7], dtype=np.int32))
    assert labels.tolist() == [11, 12, IGNORE, IGNORE, 15, 16, IGNORE]


def test_microbatch_positions_and_docs():
    mb = make_microbatch(np.arange(6), np.array([0, 2, 6], dtype=np.int32), torch.device("cpu"))
    assert mb.ctx.positions.tolist() == [0, 1, 0, 1, 2, 3]
    assert mb.ctx.doc_ids.tolist() == [0, 0, 1, 1, 1, 1]
    assert mb.num_tokens == 6 and mb.num_targets == 4
