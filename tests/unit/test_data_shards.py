"""data.shards: listing (fail fast), the tar reader (grouping, skipping, striding), slots, cursors."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import webdataset as wds

from data.config import DatasetConfig
from data.errors import DataError
from data.shards import SourceStream, iter_samples, list_shards, read_samples, read_shard, slot_plan
from data_stream_fixtures import write_text_shards


def test_list_shards_globs_braces_and_fails_fast_on_missing(tmp_path):
    write_text_shards(str(tmp_path), "a", 3, 1)
    root = str(tmp_path / "a")
    listed = list_shards(DatasetConfig("a", [f"{root}/shard-*.tar"]))
    assert [os.path.basename(p) for p in listed] == [f"shard-00000{i}.tar" for i in range(3)]
    assert list_shards(DatasetConfig("a", [f"{root}/shard-{{000000..000001}}.tar"])) == listed[:2]
    with pytest.raises(DataError, match=r"data set 'a': shard pattern '.*/nope-\*.tar' matches no file"):
        list_shards(DatasetConfig("a", [f"{root}/shard-*.tar", f"{root}/nope-*.tar"]))
    with pytest.raises(DataError, match=r"shard '.*/shard-000009.tar' does not exist"):
        list_shards(DatasetConfig("a", [f"{root}/shard-000009.tar"]))


def test_reader_groups_members_and_skips_without_reading(tmp_path):
    path = str(tmp_path / "s.tar")
    with wds.TarWriter(path) as sink:
        for i in range(6):
            sink.write({"__key__": f"k{i}", "txt": b"t%d" % i, "json": b"{}"})
    samples = list(iter_samples(path))
    assert [i for i, _ in samples] == list(range(6))
    assert samples[2][1] == {"__key__": "k2", "__url__": path, "txt": b"t2", "json": b"{}"}
    assert [s["__key__"] for _, s in iter_samples(path, start=4)] == ["k4", "k5"]
    assert [i for i, _ in iter_samples(path, start=1, stride=2, phase=1)] == [1, 3, 5]
    again = read_samples([[path]], [(0, 0, 3), (0, 0, 1), (0, 0, 3)])
    assert [s["txt"] for s in again] == [b"t3", b"t1", b"t3"]


@pytest.mark.parametrize("num_shards,num_slots", [(8, 4), (7, 4), (3, 4), (2, 6), (1, 4), (5, 5)])
def test_slots_cover_every_sample_exactly_once(num_shards, num_slots):
    samples_per_shard = [11 + s for s in range(num_shards)]
    seen = Counter()
    for slot in range(num_slots):
        plan = slot_plan(num_shards, slot, num_slots)
        assert plan, f"slot {slot} got nothing to read"
        for shard, stride, phase in plan:
            seen.update((shard, i) for i in range(samples_per_shard[shard]) if i % stride == phase)
    assert seen == Counter({(s, i): 1 for s in range(num_shards) for i in range(samples_per_shard[s])})


def _stream(paths, **kw):
    bad = []
    stream = SourceStream(0, "a", paths, kw.get("slot", 0), kw.get("slots", 1), seed=3,
                          max_epochs=kw.get("epochs"), on_bad_shard=lambda s, e: bad.append(e))
    return stream, bad


def test_cursor_resumes_exactly_and_epochs_reshuffle(tmp_path):
    write_text_shards(str(tmp_path), "a", 4, 5)
    paths = list_shards(DatasetConfig("a", [str(tmp_path / "a" / "*.tar")]))
    stream, _ = _stream(paths)
    full = [stream.next()[0] for _ in range(50)]  # two and a half epochs of 20 samples
    assert len(set(full[:20])) == 20 and set(full[:20]) == set(full[20:40])
    assert [k[1] for k in full[:20]] != [k[1] for k in full[20:40]]  # shard order changes per epoch
    for stop in (0, 7, 20, 33):
        first, _ = _stream(paths)
        for _ in range(stop):
            first.next()
        resumed, _ = _stream(paths)
        resumed.load_state(first.state())
        assert [resumed.next()[0] for _ in range(50 - stop)] == full[stop:]


def test_finite_epochs_end_and_an_unreadable_data_set_is_an_error(tmp_path):
    write_text_shards(str(tmp_path), "a", 2, 3)
    paths = list_shards(DatasetConfig("a", [str(tmp_path / "a" / "*.tar")]))
    stream, _ = _stream(paths, epochs=2)
    assert sum(1 for _ in iter(stream.next, None)) == 12 and stream.exhausted
    for p in paths:
        os.remove(p)
    gone, bad = _stream(paths)
    with pytest.raises(DataError, match="'a': a full pass over its 2 shard"):
        gone.next()
    assert len(bad) == 2 and all("missing" in e.reason for e in bad)


def test_resume_seeks_to_the_saved_byte_offset_where_the_source_can(tmp_path):
    write_text_shards(str(tmp_path), "a", 1, 12)
    path = str(tmp_path / "a" / "shard-000000.tar")
    first, _ = _stream([path])
    for _ in range(7):
        first.next()
    state = first.state()
    expected = [first.next()[1]["txt"] for _ in range(5)]
    byte = state[-1]
    assert byte > 0 and [s["txt"] for _, s, _ in read_shard(path, 7, at_byte=byte)] == expected
    with open(path, "r+b") as f:  # wipe everything before the saved sample: only a seek can still read on
        f.write(b"\0" * byte)
    resumed, bad = _stream([path])
    resumed.load_state(state)
    assert [resumed.next()[1]["txt"] for _ in range(5)] == expected and bad == []
    legacy, bad = _stream([path])  # a state without the byte offset reads from the start: the wiped part
    legacy.load_state(state[:4])
    with pytest.raises(DataError, match="returned no readable sample"):
        legacy.next()
    assert bad and "empty" in bad[0].reason
