"""A directory of shards served over HTTP on 127.0.0.1, for the data benchmark and the data-source tests.

Python's http.server in a thread of the calling process, bound to the loopback address only (never another
interface), on a free port. It stops when the `with` block ends, when `stop()` is called (a test stopping the
server mid-epoch), or by itself after `lifetime_s`, so a test or bench that hangs cannot leave it running.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

LOOPBACK = "127.0.0.1"


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without a log line per request (they would bury the test and bench output)."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class' name
        pass


class LoopbackServer:
    def __init__(self, root: str, handler: type[SimpleHTTPRequestHandler], lifetime_s: float) -> None:
        self._server = ThreadingHTTPServer((LOOPBACK, 0), partial(handler, directory=root))
        self._server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-http", daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = threading.Lock()
        self._thread.start()
        self._timer.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket (new connections are refused). Idempotent."""
        if not self._stopped.acquire(blocking=False):
            return
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@contextmanager
def serve_directory(root: str, handler: type[SimpleHTTPRequestHandler] = QuietHandler,
                    lifetime_s: float = 600.0) -> Iterator[LoopbackServer]:
    """`with serve_directory(dir) as server:` files of `dir` at `server.url + "/<name>"`."""
    server = LoopbackServer(root, handler, lifetime_s)
    try:
        yield server
    finally:
        server.stop()
