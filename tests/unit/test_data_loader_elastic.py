"""Elastic resume of the data: a stage's loader state saved on 2 data-parallel ranks resumes on 1 rank, and
that one's on 2 ranks again with another worker count. The stage's streams (fixed when it started) move to
whichever rank and worker now serves them, each continuing from its own cursors, mixture position and
packing buffer: over the epoch every sample of every data set is read exactly once across the changes."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest

from data.errors import DataError
from data.loader import StreamingLoader
from data_stream_fixtures import byte_encode, text_config, write_text_shards

SEQ = 512


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("corpus"))
    write_text_shards(root, "web", 5, 24)  # more shards than streams: whole shards per stream
    write_text_shards(root, "books", 3, 14)  # fewer: the streams share shards sample by sample
    return root


def loader(root: str, dp_rank: int, dp_size: int, workers: int) -> StreamingLoader:
    cfg = text_config(root, {"web": 3.0, "books": 1.0}, num_workers=workers, prefetch_factor=2, max_epochs=1)
    return StreamingLoader(cfg, byte_encode, SEQ, dp_rank=dp_rank, dp_size=dp_size)


def keys(batches) -> list[tuple[int, str]]:
    """(data set, shard/sample key) of every document of the batches."""
    out = []
    for batch in batches:
        starts = batch.cu_seqlens[:-1].long()
        out += list(zip(batch.source_ids[starts].tolist(), batch.doc_keys))
    return out


def test_two_ranks_to_one_to_two_reads_every_sample_once(corpus: str) -> None:
    everything = keys(iter(loader(corpus, 0, 1, 0)))  # one epoch, one stream
    assert len(everything) == 5 * 24 + 3 * 14 and len(set(everything)) == len(everything)

    first = [loader(corpus, r, 2, 2) for r in (0, 1)]  # 2 ranks x 2 workers: the stage's 4 streams
    read = [keys(itertools.islice(iter(one), 4)) for one in first]
    states = [one.state_dict() for one in first]

    single = loader(corpus, 0, 1, 0)  # 1 rank, 1 worker serves all 4 streams in turn
    single.load_state_dict(states)
    read.append(keys(itertools.islice(iter(single), 5)))

    again = [loader(corpus, r, 2, 1) for r in (0, 1)]  # 2 ranks x 1 worker: 2 streams each
    for one in again:
        one.load_state_dict([single.state_dict()])
        read.append(keys(iter(one)))  # to the end of the epoch

    got = Counter(key for part in read for key in part)
    assert sorted(got) == sorted(everything) and set(got.values()) == {1}, "each sample exactly once"
    assert Counter(source for source, _ in got) == {0: 5 * 24, 1: 3 * 14}  # per data set


def test_same_layout_resume_continues_exactly(corpus: str) -> None:
    straight = loader(corpus, 1, 2, 0)
    reference = keys(itertools.islice(iter(straight), 6))
    first = loader(corpus, 1, 2, 0)
    got = keys(itertools.islice(iter(first), 2))
    resumed = loader(corpus, 1, 2, 0)
    resumed.load_state_dict(first.state_dict())
    assert got + keys(itertools.islice(iter(resumed), 4)) == reference


def test_more_slots_than_streams_is_refused_in_one_line(corpus: str) -> None:
    small = loader(corpus, 0, 1, 0)  # the stage started with 1 stream
    next(iter(small))
    with pytest.raises(DataError, match=r"split into 1 streams when it started; 2 data-parallel ranks x 1 "
                                         r"workers = 2 cannot share them") as err:
        loader(corpus, 0, 2, 0).load_state_dict(small.state_dict())
    assert "\n" not in str(err.value)
