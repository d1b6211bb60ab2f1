"""paho's socket I/O on the event loop, cheaper per packet: buffered reads, writes without a detour.

Reads: paho reads a packet with one recv for its first byte, one per byte of its remaining length,
then one or more for the rest: about nine system calls per 64 KiB update chunk, each also a trip
through Python. Under paho's socket we put a reader that fills a buffer of its own with one recv and
hands paho slices of it. It says how much it holds through `pending()`, which aiomqtt's read callback
already asks of TLS sockets (paho issue #131): it calls paho again while bytes are buffered, so
nothing waits in the buffer for the socket's next readiness.

Writes: for every packet queued (a PUBACK per chunk) aiomqtt registers a writer through
`call_soon_threadsafe`, since paho may queue from another thread: a self-pipe write and read, two
epoll changes and one more loop pass each time. Queued on the loop's own thread, the packets are
now written at the end of the current step instead, all at once; only what the socket does not take
then (or a packet queued from another thread) goes the writer-callback way.
"""

from __future__ import annotations

import asyncio
from typing import Any

READ_BYTES = 128 << 10  # one read: two 64 KiB chunks; kept for the connection's life


class BufferedSocket:
    """A socket (plain, TLS or paho's websocket wrapper) read through a buffer; all else passes."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = bytearray(READ_BYTES)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0

    def recv(self, size: int) -> bytes:
        if self._pos == self._end:
            n = self._sock.recv_into(self._buf) if hasattr(self._sock, "recv_into") else self._fill()
            if n == 0:
                return b""  # closed by the peer
            self._pos, self._end = 0, n
        start = self._pos
        self._pos = min(self._end, start + size)
        return bytes(self._view[start:self._pos])

    def _fill(self) -> int:
        data = self._sock.recv(READ_BYTES)
        self._buf[: len(data)] = data
        return len(data)

    def pending(self) -> int:
        """Bytes readable without waiting for the socket: ours, and a TLS layer's decrypted ones."""
        inner = getattr(self._sock, "pending", None)
        return (self._end - self._pos) + (inner() if inner is not None else 0)

    def close(self) -> None:
        self._view.release()
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def buffer_reads(paho: Any) -> None:
    """Wrap each socket paho opens (every connect) before anyone registers it for reading. paho's
    own network thread (`loop_start`) also asks `pending()` before it waits in select."""
    opened = paho.on_socket_open

    def on_socket_open(client: Any, userdata: Any, sock: Any) -> None:
        wrapped = BufferedSocket(sock)
        client._sock = wrapped
        if opened is not None:
            opened(client, userdata, wrapped)

    paho.on_socket_open = on_socket_open


def install(paho: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Under aiomqtt: buffered reads, and packets queued on `loop`'s thread written at the end of
    the step."""
    buffer_reads(paho)
    register_write = paho.on_socket_register_write  # aiomqtt's: a writer callback on the loop

    def write_now(client: Any, userdata: Any, sock: Any) -> None:
        try:
            client.loop_write()
        except Exception:  # a broken connection: aiomqtt's writer callback meets it and reports it
            register_write(client, userdata, sock)
            return
        if client.want_write():  # the socket's buffer is full: wait for it to drain
            register_write(client, userdata, sock)

    def on_socket_register_write(client: Any, userdata: Any, sock: Any) -> None:
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            loop.call_soon(write_now, client, userdata, sock)
        elif register_write is not None:
            register_write(client, userdata, sock)

    paho.on_socket_register_write = on_socket_register_write
