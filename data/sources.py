"""Where shards come from: listing a data set's shard URLs at start-up and opening one shard for reading.

A shard is named the way webdataset names it, and opened by webdataset's own opener (`webdataset.gopen`) or by
fsspec, never by I/O code of ours:
- a local path, glob or brace range (`/data/cap/shard-{000..099}.tar`), listed and checked at start-up;
- `pipe:COMMAND` (`pipe:aws s3 cp s3://b/x.tar -`) and `http(s)://...` (gopen runs the command or curl);
  these cannot be listed, so only brace ranges are expanded and a shard that fails is found when read;
- any protocol fsspec has a filesystem for (`s3://` with the `s3` extra -> s3fs, `gs://` with the `gcs`
  extra -> gcsfs, ...): globs are listed through fsspec; a missing package is one line naming the extra;
- `@LIST` (`@/data/train.txt`): a text file of shard URLs or patterns, one a line (`#` comments); relative
  paths in it are relative to the list file.
`.tar.gz` / `.tgz` shards (any source) are recognised by their gzip magic bytes and decompressed on the fly.

Sources that can seek (local files, fsspec files) are returned seekable, so the tar reader seeks over the
samples it skips; pipes and HTTP streams are read front to back. A source that fails to deliver raises
`FetchError` (retried by the stream with `FetchRetry`); a local file that is gone is a plain `ShardError`.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import IO, Any

from braceexpand import braceexpand
from webdataset.gopen import gopen

from data.config import DatasetConfig
from data.errors import DataError, FetchError, ShardError

log = logging.getLogger(__name__)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: "C:" is a drive, not a scheme
GOPEN_SCHEMES = ("pipe", "http", "https")
# The pyproject extra that installs fsspec's filesystem for a protocol (the one-line error names it).
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


def scheme(url: str) -> str:
    """'' for a local path, else the URL's scheme ('pipe', 'http', 's3', ...)."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def list_shards(dataset: DatasetConfig) -> list[str]:
    """The data set's shard URLs in config order (globs sorted). Raises DataError on an unmatched pattern,
    a missing local shard or list file, or a protocol whose filesystem is not installed."""
    found: list[str] = []
    for pattern in dataset.shards:
        if pattern.startswith("@"):
            for line in _list_file(dataset.name, pattern[1:]):
                found.extend(_expand(dataset.name, line))
        else:
            found.extend(_expand(dataset.name, pattern))
    return list(dict.fromkeys(found))  # a shard listed twice would be read twice per epoch


def _list_file(name: str, path: str) -> list[str]:
    if scheme(path):
        with _Closing(open_source(path)) as f:
            text, base = f.read().decode(), ""
    else:
        if not os.path.isfile(path):
            raise DataError(f"data set {name!r}: shard list file {path!r} does not exist")
        with open(path) as f:
            text, base = f.read(), os.path.dirname(os.path.abspath(path))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        raise DataError(f"data set {name!r}: shard list file {path!r} names no shard")
    nested = [ln for ln in lines if ln.startswith("@")]
    if nested:
        raise DataError(f"data set {name!r}: shard list file {path!r} names another list ({nested[0]!r})")
    return [ln if scheme(ln) or os.path.isabs(ln) or not base else os.path.join(base, ln) for ln in lines]


def _expand(name: str, pattern: str) -> list[str]:
    found: list[str] = []
    for expanded in braceexpand(pattern):
        kind = scheme(expanded)
        if kind in GOPEN_SCHEMES:
            found.append(expanded)  # cannot be listed: a shard that fails is retried, counted and skipped
        elif kind == "file":
            found.extend(_expand_local(name, re.sub(r"^file://", "", expanded)))
        elif kind:
            found.extend(_expand_fsspec(name, kind, expanded))
        else:
            found.extend(_expand_local(name, expanded))
    return found


def _expand_local(name: str, path: str) -> list[str]:
    if glob.has_magic(path):
        matches = sorted(glob.glob(path))
        if not matches:
            raise DataError(f"data set {name!r}: shard pattern {path!r} matches no file")
        return matches
    if not os.path.isfile(path):
        raise DataError(f"data set {name!r}: shard {path!r} does not exist")
    return [path]


def _filesystem(name: str, protocol: str, url: str) -> Any:
    import fsspec

    try:
        return fsspec.filesystem(protocol)
    except ImportError:
        package, extra = EXTRAS.get(protocol, (f"fsspec's {protocol} filesystem", ""))
        how = f"pip install 'longvl[{extra}]'" if extra else "see fsspec's list of implementations"
        raise DataError(f"data set {name!r}: shard {url!r} needs {package}, which is not installed ({how})") \
            from None
    except ValueError:
        raise DataError(f"data set {name!r}: shard {url!r}: no reader for {protocol}:// (local paths, "
                        f"pipe:, http(s):// and fsspec protocols such as s3:// and gs:// are)") from None


def _expand_fsspec(name: str, protocol: str, url: str) -> list[str]:
    fs = _filesystem(name, protocol, url)
    if not glob.has_magic(url):
        return [url]  # not checked here: one request per shard at start-up; a missing one is counted when read
    matches = sorted(fs.glob(url))
    if not matches:
        raise DataError(f"data set {name!r}: shard pattern {url!r} matches no object")
    return [fs.unstrip_protocol(m) for m in matches]


def open_source(url: str) -> IO[bytes]:
    """The shard's raw bytes: a local or fsspec file (seekable) or a gopen pipe (pipe:, http(s)://).

    Raises ShardError for a local file that is gone, FetchError for a remote source that failed."""
    kind = scheme(url)
    try:
        if kind in GOPEN_SCHEMES:
            return gopen(url, "rb")
        if kind and kind != "file":
            import fsspec

            return RemoteFile(fsspec.open(url, "rb").open(), url)
        return gopen(url, "rb")
    except FileNotFoundError:
        if kind in ("", "file"):
            raise ShardError(url, "missing (deleted or moved after start-up)") from None
        raise FetchError(url, "not found at the source") from None
    except OSError as e:
        if kind in ("", "file"):
            raise ShardError(url, f"cannot be opened: {e}") from None
        raise FetchError(url, f"cannot be fetched: {e}") from None
    except ValueError as e:  # refused by the opener itself (e.g. pipe: with WDS_SECURE=1): retrying won't help
        raise ShardError(url, f"cannot be opened: {e}") from None


class _Closing:
    def __init__(self, source: IO[bytes]) -> None:
        self.source = source

    def __enter__(self) -> IO[bytes]:
        return self.source

    def __exit__(self, *exc: object) -> None:
        close_source(self.source)


def close_source(source: IO[bytes]) -> None:
    """Close without raising; a pipe command still running (the reader stopped early) is killed first, so
    that its exit status (SIGPIPE, killed) is not mistaken for a failure and no process is left behind."""
    proc = getattr(source, "proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
    try:
        source.close()
    except Exception:  # noqa: BLE001 - a failed close after reading changes nothing we returned
        pass


class RemoteFile:
    """A seekable remote (fsspec) file whose read failures are FetchError, retried like a stream's."""

    def __init__(self, source: IO[bytes], url: str) -> None:
        self.source, self.url = source, url

    def read(self, size: int = -1) -> bytes:
        try:
            return self.source.read(size)
        except OSError as e:
            raise FetchError(self.url, f"fetch failed: {str(e).splitlines()[0][:200]}") from None

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.source.seek(offset, whence)

    def tell(self) -> int:
        return self.source.tell()

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.source.close()


class SequentialSource:
    """A non-seekable source read front to back: turns its I/O failures into FetchError and trusts the end of
    a pipe only once the command exited with success (a cut HTTP transfer is curl's non-zero exit, not EOF).
    `count` is how many bytes were handed out."""

    def __init__(self, source: IO[bytes], url: str) -> None:
        self.source, self.url, self.head, self.count = source, url, b"", 0
        self._ended = False

    def peek(self, size: int) -> bytes:
        """The next `size` bytes without consuming them (to sniff the format)."""
        if len(self.head) < size:
            self.head += self._read(size - len(self.head))
        return self.head[:size]

    def read(self, size: int = -1) -> bytes:
        data, self.head = (self.head[:size], self.head[size:]) if size >= 0 else (self.head, b"")
        if size < 0 or len(data) < size:
            data += self._read(size - len(data) if size >= 0 else -1)
        self.count += len(data)
        return data

    def _read(self, size: int) -> bytes:
        if self._ended:
            return b""
        try:
            data = self.source.read(size)
            if not data and size != 0:
                self._ended = True
                if hasattr(self.source, "wait_for_child"):
                    self.source.close()  # a gopen Pipe: waits for the command, raises on a failed exit status
        except OSError as e:
            raise FetchError(self.url, f"fetch failed: {_reason(self.source, e)}") from None
        return data


def _reason(source: IO[bytes], error: OSError) -> str:
    """`curl exited with status 7` for a gopen pipe (its message repeats the whole command), else the error."""
    status = re.search(r"exit (-?\d+)", str(error))
    args = getattr(source, "args", None)  # gopen's Pipe keeps ((command,), popen_kwargs)
    if status and args and args[0]:
        command = args[0][0]
        program = command[0] if isinstance(command, (list, tuple)) else str(command).split()[0]
        return f"{program} exited with status {status.group(1)}"
    return str(error).splitlines()[0][:200]


@dataclass
class FetchRetry:
    """How often a shard whose source failed is opened again (from the sample it stopped at) before it is
    counted and skipped as a bad shard; the wait doubles from `backoff_s`."""

    attempts: int = 3
    backoff_s: float = 1.0

    def wait(self, attempt: int, error: FetchError) -> None:
        delay = self.backoff_s * 2 ** (attempt - 1)
        log.warning("shard %s: %s; retry %d of %d in %.1f s", error.path, error.reason, attempt, self.attempts,
                    delay)
        time.sleep(delay)
