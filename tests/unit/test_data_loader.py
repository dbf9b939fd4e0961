"""data.loader: exact resume under DataLoader prefetch, refusal of a state from another mix, stats."""
from __future__ import annotations

import itertools
import json
from dataclasses import fields

import pytest
import torch

from data.errors import DataError
from data.loader import StreamingLoader
from data_stream_fixtures import byte_encode, text_config, write_text_shards

SEQ = 512


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    write_text_shards(root, "web", 5, 40)
    write_text_shards(root, "books", 3, 30)
    write_text_shards(root, "code", 1, 25)  # fewer shards than workers: striding inside the shard
    return root


def mix(root, **overrides):
    settings = dict(num_workers=2, prefetch_factor=4, temperature=0.5)
    settings.update(overrides)
    return text_config(root, {"web": 3.0, "books": 1.0, "code": 1.0}, **settings)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def assert_same(a, b):
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(x, y) if torch.is_tensor(x) else x == y, f"{f.name} differs"


def test_resume_after_any_stop_is_bitwise_identical(corpus):
    reference = take(StreamingLoader(mix(corpus), byte_encode, SEQ), 30)
    code_docs = sum(int((b.source_ids[b.cu_seqlens[:-1].long()] == 2).sum()) for b in reference)
    assert code_docs > 25  # "code" (25 samples) wraps into its next epoch within the run
    for stop in (1, 13, 20):
        first = StreamingLoader(mix(corpus), byte_encode, SEQ)
        head = take(first, stop)  # workers have prefetched well past `stop` by now
        state = json.loads(json.dumps(first.state_dict()))  # plain data: survives JSON
        assert len(json.dumps(state)) < 4096
        second = StreamingLoader(mix(corpus), byte_encode, SEQ)
        second.load_state_dict(state)
        tail = take(second, 30 - stop)
        assert second.batches_yielded == 30
        for got, want in zip(head + tail, reference):
            assert_same(got, want)


@pytest.mark.parametrize("buffer_bytes", [None, 12_000])
def test_resume_twice_and_after_an_epoch_boundary(corpus, buffer_bytes):
    """Also with a packing buffer bounded in bytes (~33 bytes a text token: a few documents)."""
    reference = take(StreamingLoader(mix(corpus, num_workers=0, buffer_bytes=buffer_bytes), byte_encode, SEQ), 24)
    loader = StreamingLoader(mix(corpus, num_workers=0, buffer_bytes=buffer_bytes), byte_encode, SEQ)
    got = take(loader, 5)
    for chunk in (9, 10):
        resumed = StreamingLoader(mix(corpus, num_workers=0, buffer_bytes=buffer_bytes), byte_encode, SEQ)
        resumed.load_state_dict(loader.state_dict())
        if buffer_bytes is not None:  # the bytes bound, not packing_buffer=8, limits the buffer
            assert 1 <= len(loader.state_dict()["streams"]["0"]["buffer"]) < 8
        got += take(resumed, chunk)
        loader = resumed
    for a, b in zip(got, reference, strict=True):
        assert_same(a, b)


def test_packing_buffer_stops_filling_at_buffer_bytes():
    from data.batch import Document
    from data.packing import BestFitPacker, BufferEntry

    docs = iter(Document(key=str(i), source=0, input_ids=torch.zeros(n, dtype=torch.long),
                         position_ids=torch.zeros(3, n, dtype=torch.long), target_mask=torch.ones(n, dtype=torch.bool),
                         pixel_values=torch.zeros(n * 4, 1536, dtype=torch.uint8))
                for i, n in enumerate([100, 50, 200, 30, 80, 60] * 4))
    packer = BestFitPacker(512, 64, "sqrt", buffer_bytes=400_000)
    packer.next_sequence(lambda: next((BufferEntry(d, None) for d in docs), None))
    held = sum(e.doc.nbytes for e in packer.buffer)
    assert 1 <= len(packer.buffer) < 64 and held - max(e.doc.nbytes for e in packer.buffer) < 400_000


@pytest.mark.parametrize("change,named", [
    (dict(seed=99), "seed: state 1234, now 99"),
    (dict(temperature=1.0), "temperature"),
    (dict(loss_weighting="per_token"), "loss_weighting"),
    (dict(packing_buffer=4), "packing_buffer"),
])
def test_state_from_another_mix_is_refused_naming_the_difference(corpus, change, named):
    source = StreamingLoader(mix(corpus), byte_encode, SEQ)
    take(source, 2)
    with pytest.raises(DataError, match=named):
        StreamingLoader(mix(corpus, **change), byte_encode, SEQ).load_state_dict(source.state_dict())


def test_state_from_another_layout_weights_or_seq_len_is_refused(corpus):
    state = StreamingLoader(mix(corpus), byte_encode, SEQ).state_dict()
    with pytest.raises(DataError, match=r"seq_len: state 512, now 1024"):
        StreamingLoader(mix(corpus), byte_encode, 1024).load_state_dict(state)
    # Another layout is fine while it has no more ranks x workers than the stage's streams (elastic tests).
    with pytest.raises(DataError, match=r"split into 2 streams when it started; 2 data-parallel ranks x 2 workers"):
        StreamingLoader(mix(corpus), byte_encode, SEQ, dp_rank=1, dp_size=2).load_state_dict(state)
    reweighted = mix(corpus)
    reweighted.datasets[1].weight = 2.0
    with pytest.raises(DataError, match=r"weights: state \[3.0, 1.0, 1.0\], now \[3.0, 2.0, 1.0\]"):
        StreamingLoader(reweighted, byte_encode, SEQ).load_state_dict(state)
    fewer = mix(corpus)
    fewer.datasets.pop()
    with pytest.raises(DataError, match=r"datasets: state \['web', 'books', 'code'\], now \['web', 'books'\]"):
        StreamingLoader(fewer, byte_encode, SEQ).load_state_dict(state)


def test_batches_carry_the_mixture_and_stats_count_what_was_consumed(corpus):
    loader = StreamingLoader(mix(corpus, loss_weighting="per_sample"), byte_encode, SEQ)
    batches = take(loader, 20)
    docs = sum(len(b.doc_keys) for b in batches)
    assert sum(s["samples"] for s in loader.stats().values()) >= docs  # plus what sits in the buffers
    # per_sample weighting: each document's weights sum to 1, so the global sum counts documents.
    assert float(sum(b.loss_weights.sum() for b in batches)) == pytest.approx(docs, rel=1e-5)
    web = sum(int((b.source_ids == 0).sum()) for b in batches)
    books = sum(int((b.source_ids == 1).sum()) for b in batches)
    assert web > books > 0  # weights 3:1 at temperature 0.5 -> about 1.7:1
    for b in batches:
        assert b.seq_len == SEQ and int(b.cu_seqlens[-1]) == SEQ
        assert 1 - b.num_pad / SEQ > 0.9


def test_document_multiple_pads_every_document_of_the_same_stream(corpus):
    """The per-document context-parallel split asks the loader for documents padded to 2*cp: each segment is
    a multiple of it, and the documents are those of the same stream (the same first ones, same tokens)."""
    plain = take(StreamingLoader(mix(corpus, num_workers=0), byte_encode, SEQ), 12)
    padded = take(StreamingLoader(mix(corpus, num_workers=0), byte_encode, SEQ, document_multiple=8), 12)
    for batch in padded:
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        assert batch.seq_len == SEQ and all(n % 8 == 0 for n in lengths), lengths
        assert int((batch.source_ids >= 0).sum()) == SEQ - batch.num_pad
    first, want = padded[0], plain[0]
    assert first.doc_keys[0] == want.doc_keys[0]
    n = int(want.cu_seqlens[1])
    assert torch.equal(first.input_ids[:n], want.input_ids[:n]) and int(first.cu_seqlens[1]) == -(-n // 8) * 8
    with pytest.raises(DataError, match="seq_len=512 is not a multiple of the per-document padding multiple 24"):
        StreamingLoader(mix(corpus), byte_encode, SEQ, document_multiple=24)
