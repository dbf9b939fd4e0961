"""Context-parallel shares of a packed sequence (train/parallel/context.py): the per-document split that
Transformer Engine's THD context parallelism reads, next to the whole-sequence one."""
from __future__ import annotations

import pytest
import torch

from train.parallel.context import context_shares, document_shard_index, shard_index


def test_document_split_gives_each_rank_chunks_r_and_mirror_of_every_document():
    cu = torch.tensor([0, 8, 8, 20, 32])  # documents of 8, 0 and 12 tokens, then a 12-token pad tail
    assert document_shard_index(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 10, 17, 18, 19, 20, 21, 22, 29, 30, 31]
    assert document_shard_index(cu, 2, 1).tolist() == [2, 3, 4, 5, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28]
    shares = context_shares("document", cu, 32, 2)
    assert sorted(torch.cat(shares).tolist()) == list(range(32))  # every position exactly once
    assert all(len(s) == 16 for s in shares)  # and the same number of rows on every rank


def test_document_split_at_cp4_holds_a_quarter_of_every_document_balanced():
    cu = torch.tensor([0, 16, 48, 64])
    shares = context_shares("document", cu, 64, 4)
    assert sorted(torch.cat(shares).tolist()) == list(range(64))
    for rank, share in enumerate(shares):
        in_doc = share[(share >= 16) & (share < 48)] - 16  # the 32-token document: chunks of 4
        assert in_doc.tolist() == list(range(4 * rank, 4 * rank + 4)) + list(range(28 - 4 * rank, 32 - 4 * rank))


def test_sequence_split_is_megatrons_load_balanced_one():
    shares = context_shares("sequence", torch.tensor([0, 5, 32]), 32, 2)
    assert [s.tolist() for s in shares] == [shard_index(32, 2, r, load_balanced=True).tolist() for r in range(2)]
    assert shares[0].tolist() == list(range(8)) + list(range(24, 32))


def test_a_document_not_padded_to_2cp_is_named():
    with pytest.raises(ValueError, match="document 1 of the packed sequence has 10 tokens, not a multiple of "
                                         "2 x parallel.cp = 4"):
        document_shard_index(torch.tensor([0, 8, 18, 20]), 2, 0)
    with pytest.raises(ValueError, match="layout 'ring' is not one of"):
        context_shares("ring", torch.tensor([0, 8]), 8, 2)
