"""Shard sources (data/sources.py): HTTP from a server on 127.0.0.1 started here, `pipe:cat`, gzip, fsspec,
list files. Every source reads the same samples as the local files, resumes exactly at several points, and a
source that fails is retried, then counted and skipped while the loader goes on."""
from __future__ import annotations

import gzip
import importlib.util
import itertools
import logging
import os
import shutil
import tarfile
from http.server import SimpleHTTPRequestHandler

import fsspec
import pytest

from bench.loopback_http import QuietHandler, serve_directory
from data.config import DataConfig, DatasetConfig
from data.errors import DataError
from data.loader import StreamingLoader
from data.shards import iter_samples, list_shards
from data_stream_fixtures import byte_encode, text_config, write_text_shards

SEQ = 256
SHARDS, PER_SHARD = 3, 14


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """root/web/shard-00000N.tar and a gzipped copy root/gz/shard-00000N.tar.gz."""
    root = str(tmp_path_factory.mktemp("sources"))
    write_text_shards(root, "web", SHARDS, PER_SHARD)
    os.makedirs(f"{root}/gz")
    for i in range(SHARDS):
        with open(f"{root}/web/shard-{i:06d}.tar", "rb") as src, gzip.open(f"{root}/gz/shard-{i:06d}.tar.gz",
                                                                            "wb") as dst:
            shutil.copyfileobj(src, dst)
    for i in range(SHARDS):  # fsspec's in-memory filesystem stands in for an object store (seekable files)
        fsspec.filesystem("memory").pipe(f"/sources/shard-{i:06d}.tar",
                                         open(f"{root}/web/shard-{i:06d}.tar", "rb").read())
    return root


def _config(shards: list[str], **overrides) -> DataConfig:
    base = dict(datasets=[DatasetConfig("web", shards)], packing_buffer=4, num_workers=0, seed=7,
                max_epochs=1, fetch_retries=2, fetch_backoff_s=0.01)
    base.update(overrides)
    return DataConfig(**base)


def _keys(batches) -> list[list[str]]:
    return [list(b.doc_keys) for b in batches]


def _sources(root: str, url: str) -> dict[str, list[str]]:
    brace = f"{{000000..{SHARDS - 1:06d}}}"
    return {"http": [f"{url}/web/shard-{brace}.tar"], "pipe": [f"pipe:cat {root}/web/shard-{brace}.tar"],
            "gzip": [f"{root}/gz/shard-*.tar.gz"], "http_gzip": [f"{url}/gz/shard-{brace}.tar.gz"],
            "fsspec": ["memory://sources/shard-*.tar"]}


def test_every_source_reads_and_resumes_like_local_files(corpus):
    local = _config([f"{corpus}/web/shard-*.tar"], max_epochs=2)
    reference = _keys(StreamingLoader(local, byte_encode, SEQ))
    assert len(reference) > 8
    with serve_directory(corpus) as server:
        for kind, shards in _sources(corpus, server.url).items():
            cfg = _config(shards, max_epochs=2)
            assert _keys(StreamingLoader(cfg, byte_encode, SEQ)) == reference, kind
            for stop in (1, len(reference) // 2, len(reference) - 2):  # inside a shard, near the end
                first = StreamingLoader(cfg, byte_encode, SEQ)
                head = _keys(itertools.islice(iter(first), stop))
                resumed = StreamingLoader(cfg, byte_encode, SEQ)
                resumed.load_state_dict(first.state_dict())
                assert head + _keys(resumed) == reference, f"{kind}: resume after {stop} batches"


def test_streams_skip_and_stride_like_seekable_files(corpus):
    path = f"{corpus}/web/shard-000001.tar"
    expected = [(i, s["txt"]) for i, s in iter_samples(path, start=5, stride=3, phase=2)]
    assert [i for i, _ in expected] == [5, 8, 11]
    for url in (f"pipe:cat {path}", f"{corpus}/gz/shard-000001.tar.gz"):
        assert [(i, s["txt"]) for i, s in iter_samples(url, start=5, stride=3, phase=2)] == expected


class _CutOnce(QuietHandler):
    """Sends the first request for each file in `cut` half way, then closes the connection (curl exits 18)."""

    cut: set[str] = set()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path not in self.cut:
            return super().do_GET()
        self.cut.discard(self.path)
        data = open(self.translate_path(self.path), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.close_connection = True


def test_a_cut_transfer_is_retried_from_where_it_stopped(corpus, caplog):
    reference = _keys(StreamingLoader(_config([f"{corpus}/web/shard-*.tar"]), byte_encode, SEQ))
    handler: type[SimpleHTTPRequestHandler] = type("Cut", (_CutOnce,), {"cut": {"/web/shard-000001.tar"}})
    with serve_directory(corpus, handler) as server, caplog.at_level(logging.WARNING):
        loader = StreamingLoader(_config(_sources(corpus, server.url)["http"]), byte_encode, SEQ)
        assert _keys(loader) == reference
    assert loader.stats()["web"]["bad_shards"] == 0
    assert any("shard-000001.tar" in r.getMessage() and "retry 1 of 2" in r.getMessage() for r in caplog.records)


def test_server_stopped_mid_epoch_is_counted_skipped_and_loading_goes_on(corpus, tmp_path):
    write_text_shards(str(tmp_path), "more", 4, PER_SHARD)
    with serve_directory(str(tmp_path)) as server:
        remote = f"{server.url}/more/shard-{{000000..000003}}.tar"
        cfg = _config([], datasets=[DatasetConfig("local", [f"{corpus}/web/shard-*.tar"]),
                                    DatasetConfig("remote", [remote])])
        loader = StreamingLoader(cfg, byte_encode, SEQ)
        batches = iter(loader)
        head = [next(batches) for _ in range(2)]
        server.stop()
        rest = list(batches)  # a run goes on: the remote shards not yet opened fail, are retried, skipped
    keys = [k for b in head + rest for k in b.doc_keys]
    stats = loader.stats()
    assert sum(k.startswith("shard-") for k in keys) == stats["local"]["samples"] + stats["remote"]["samples"]
    assert stats["local"]["samples"] == SHARDS * PER_SHARD  # every local sample still arrives
    assert 1 <= stats["remote"]["bad_shards"] <= 3 and stats["remote"]["samples"] < 4 * PER_SHARD


def test_a_failing_pipe_command_is_retried_then_counted(tmp_path):
    write_text_shards(str(tmp_path), "a", 1, 5)
    cfg = _config([f"pipe:cat {tmp_path}/a/shard-000000.tar", f"pipe:cat {tmp_path}/a/missing.tar"])
    loader = StreamingLoader(cfg, byte_encode, SEQ)
    assert sum(len(b.doc_keys) for b in loader) == 5
    assert loader.stats()["web"]["bad_shards"] == 1


def test_fsspec_urls_are_listed_and_read(corpus):
    listed = list_shards(DatasetConfig("web", ["memory://sources/shard-*.tar"]))
    assert listed == [f"memory:///sources/shard-{i:06d}.tar" for i in range(SHARDS)]
    reference = _keys(StreamingLoader(_config([f"{corpus}/web/shard-*.tar"]), byte_encode, SEQ))
    assert _keys(StreamingLoader(_config(["memory://sources/shard-*.tar"]), byte_encode, SEQ)) == reference
    with pytest.raises(DataError, match=r"'memory://sources/none-\*.tar' matches no object"):
        list_shards(DatasetConfig("web", ["memory://sources/none-*.tar"]))


@pytest.mark.parametrize("url,package,extra", [("s3://bucket/a/shard-{0..3}.tar", "s3fs", "s3"),
                                               ("gs://bucket/a/shard-*.tar", "gcsfs", "gcs")])
def test_object_store_without_its_package_is_one_line_naming_the_extra(url, package, extra):
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed")
    with pytest.raises(DataError) as err:
        list_shards(DatasetConfig("web", [url]))
    assert str(err.value).count("\n") == 0 and f"needs {package}" in str(err.value)
    assert f"pip install 'longvl[{extra}]'" in str(err.value)


def test_list_files_name_shards_of_any_source(corpus, tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text(f"# three shards\n{corpus}/web/shard-000000.tar\n\n"
                       f"pipe:cat {corpus}/web/shard-000001.tar\n../{os.path.basename(tmp_path)}/x/s.tar\n")
    os.makedirs(tmp_path / "x")
    shutil.copy(f"{corpus}/web/shard-000002.tar", tmp_path / "x" / "s.tar")
    listed = list_shards(DatasetConfig("web", [f"@{listing}"]))
    assert listed[1] == f"pipe:cat {corpus}/web/shard-000001.tar" and os.path.isfile(listed[2])
    assert sum(1 for url in listed for _ in iter_samples(url)) == SHARDS * PER_SHARD
    with pytest.raises(DataError, match=r"data set 'web': shard list file '.*/nope.txt' does not exist"):
        list_shards(DatasetConfig("web", [f"@{tmp_path}/nope.txt"]))
    (tmp_path / "nested.txt").write_text(f"@{listing}\n")
    with pytest.raises(DataError, match="names another list"):
        list_shards(DatasetConfig("web", [f"@{tmp_path}/nested.txt"]))


def test_truncated_gzip_and_stream_shards_are_bad_shards(corpus, tmp_path):
    data = open(f"{corpus}/gz/shard-000000.tar.gz", "rb").read()
    (tmp_path / "cut.tar.gz").write_bytes(data[:len(data) // 2])
    whole = open(f"{corpus}/web/shard-000000.tar", "rb").read()
    with tarfile.open(f"{corpus}/web/shard-000000.tar") as tar:
        boundary = tar.getmembers()[PER_SHARD // 2].offset  # cut exactly at a header: tarfile ends silently
    (tmp_path / "cut.tar").write_bytes(whole[:boundary])
    for url in (str(tmp_path / "cut.tar.gz"), f"pipe:cat {tmp_path}/cut.tar"):
        loader = StreamingLoader(_config([f"{corpus}/web/shard-000001.tar", url]), byte_encode, SEQ)
        keys = [k for b in loader for k in b.doc_keys]
        assert sum(k.startswith("shard-000001/") for k in keys) == PER_SHARD
        assert sum(k.startswith("cut/") for k in keys) < PER_SHARD, url  # what precedes the cut may be kept
        assert loader.stats()["web"]["bad_shards"] == 1, url


def test_an_object_store_read_failure_is_retried_from_the_saved_sample(corpus, monkeypatch):
    from fsspec.implementations.memory import MemoryFile

    reference = _keys(StreamingLoader(_config([f"{corpus}/web/shard-*.tar"]), byte_encode, SEQ))
    reads, read = [0], MemoryFile.read

    def flaky_read(self, *args):
        reads[0] += 1
        if reads[0] == 20:  # once, in the middle of the first shard
            raise ConnectionResetError("connection reset by peer")
        return read(self, *args)

    monkeypatch.setattr(MemoryFile, "read", flaky_read)
    loader = StreamingLoader(_config(["memory://sources/shard-*.tar"]), byte_encode, SEQ)
    assert _keys(loader) == reference and loader.stats()["web"]["bad_shards"] == 0 and reads[0] > 20
