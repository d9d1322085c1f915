"""The delayed loopback link of the POC benchmark (``launch.delayed_link``)."""

import socket
import threading
import time

import pytest

from split_unet.launch.delayed_link import DelayedLink

pytestmark = pytest.mark.unit


def echo_server() -> tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            while data := connection.recv(1 << 16):
                connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def test_a_round_trip_is_late_by_both_delays_and_bytes_arrive_intact():
    listener, port = echo_server()
    with listener, DelayedLink(port, delay_ms=50) as link, socket.create_connection(("127.0.0.1", link.port)) as conn:
        started = time.monotonic()
        conn.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        assert time.monotonic() - started >= 0.1  # 50 ms there, 50 ms back: a lower bound, whatever the load


def test_a_large_transfer_is_late_once_not_once_per_chunk():
    listener, port = echo_server()
    payload = bytes(range(256)) * (16 * 4096)  # 16 MiB: 256 of the link's chunks
    received = bytearray()
    with listener, DelayedLink(port, delay_ms=100) as link, socket.create_connection(("127.0.0.1", link.port)) as conn:
        started = time.monotonic()
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        while len(received) < len(payload):
            received += conn.recv(1 << 20)
        elapsed = time.monotonic() - started
        sender.join()
    assert received == payload
    # Held one after another, 256 chunks would take 25.6 s each way; held side by side, 0.2 s plus the copying
    # (generous for a busy machine).
    assert elapsed < 10.0, elapsed


def test_a_negative_delay_is_refused():
    with pytest.raises(ValueError, match="delay_ms"):
        DelayedLink(1, delay_ms=-1)
