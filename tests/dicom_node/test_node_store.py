"""The spool file's fast paths: early writeback, background hashing, the exact socket read."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

import dicom_node.store as store_mod
from dicom_node.pynetdicom_patches import _recv_exactly
from dicom_node.store import WRITEBACK_EVERY, SpoolFile


def test_spool_hash_and_content_with_mixed_buffers(tmp_path: Path) -> None:
    parts = [os.urandom(n) for n in (10, 300_000, 1, 70_000)]
    spool = SpoolFile(tmp_path)
    for i, p in enumerate(parts):  # bytes are hashed on the hasher thread, the rest inline, in order
        spool.write(p if i % 2 == 0 else bytearray(p))
    spool.finish(fsync=True)
    whole = b"".join(parts)
    assert Path(spool.name).read_bytes() == whole
    assert spool.sha256.hexdigest() == hashlib.sha256(whole).hexdigest() and spool.size == len(whole)
    spool.discard()
    assert not Path(spool.name).exists()


@pytest.mark.parametrize("writeback", [True, False])
def test_writeback_starts_every_mib_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    writeback: bool) -> None:
    kicks: list[int] = []
    monkeypatch.setattr(store_mod, "start_writeback", kicks.append)
    spool = SpoolFile(tmp_path, writeback=writeback)
    chunk = os.urandom(128 * 1024)
    for _ in range(3 * WRITEBACK_EVERY // len(chunk)):
        spool.write(chunk)
    spool.finish(fsync=writeback)
    assert len(kicks) == (3 if writeback else 0)
    spool.discard()


def test_start_writeback_is_harmless(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as fh:
        fh.write(b"x" * 4096)
        store_mod.start_writeback(fh.fileno())  # a real sync_file_range call on Linux
    assert (tmp_path / "f").read_bytes() == b"x" * 4096
    if sys.platform.startswith("linux"):
        assert store_mod._SYNC_FILE_RANGE is not None


class _Sock:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def test_recv_exactly_reads_across_partial_sends_and_stops_at_close() -> None:
    a, b = socket.socketpair()
    data = os.urandom(3 * 1024 * 1024 + 17)

    def send() -> None:
        for i in range(0, len(data), 65_537):  # many partial writes
            a.sendall(data[i : i + 65_537])
        a.sendall(b"tail")
        a.close()

    t = threading.Thread(target=send)
    t.start()
    assert bytes(_recv_exactly(_Sock(b), len(data))) == data  # type: ignore[arg-type]
    assert bytes(_recv_exactly(_Sock(b), 100)) == b"tail"  # type: ignore[arg-type]  # peer closed: what there is
    t.join()
    b.close()


def test_waiting_socket_returns_as_soon_as_data_arrives() -> None:
    """The SCP's association sockets wait (up to 1 ms) for data instead of pynetdicom's
    instant check followed by a fixed 1 ms sleep."""
    import queue
    import time
    from types import SimpleNamespace

    from dicom_node.pynetdicom_patches import _READY_WAIT_S, NodeSocket

    a, b = socket.socketpair()
    events: queue.Queue[str] = queue.Queue()
    assoc = SimpleNamespace(dul=SimpleNamespace(event_queue=events))
    ws = NodeSocket(assoc, client_socket=b)  # type: ignore[arg-type]
    while not events.empty():  # the constructor announces the connection (Evt5)
        events.get_nowait()
    t0 = time.perf_counter()
    assert ws.ready is False  # nothing there: waited, then no
    assert time.perf_counter() - t0 >= _READY_WAIT_S * 0.9
    a.sendall(b"x")
    assert ws.ready is True
    b.close()
    assert ws.ready is False and events.get_nowait() == "Evt17"  # a dead socket is a closed transport
    a.close()
