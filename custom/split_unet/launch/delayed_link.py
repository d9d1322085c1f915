"""A slow link on one machine: a TCP relay on loopback that holds every chunk it passes for a fixed delay, in each
direction, so a POC federation on one machine sees a wide-area round trip (``split-unet bench --link-delay-ms``).

Kernel delay (``tc qdisc add dev lo root netem delay 10ms``) needs the ``sch_netem`` module, which a container
often lacks ("Specified qdisc kind is unknown"), and slows every loopback connection on the machine. The relay
delays only the connections made to it: the sites' connections to the server. Chunks are timed on arrival and sent
on when their delay has passed, in order and without waiting for one another, so a transfer is late by the delay
but keeps its throughput, as on a long link with a wide TCP window.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

CHUNK_BYTES = 1 << 16


class DelayedLink:
    """Relays connections to ``127.0.0.1:port`` (``self.port``) to ``127.0.0.1:target_port``, each direction
    ``delay_ms`` late. A context manager: the relay runs on a thread of its own until the ``with`` block ends."""

    def __init__(self, target_port: int, delay_ms: float):
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.target_port = target_port
        self.delay = delay_ms / 1000.0
        with socket.socket() as probe:  # a free loopback port for the relay
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delayed-link", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> "DelayedLink":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", self.port), self._loop).result(timeout=10)
        return self

    def __exit__(self, *_) -> None:
        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pass_on(client_reader, server_writer), self._pass_on(server_reader, client_writer),
                             return_exceptions=True)

    async def _pass_on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read chunks as they come, stamped with their arrival; a second task writes each once its delay passed."""
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                arrived, chunk = await held.get()
                if not chunk:
                    break
                if (wait := arrived + self.delay - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
            writer.close()

        releaser = asyncio.ensure_future(release())
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                held.put_nowait((time.monotonic(), chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            held.put_nowait((time.monotonic(), b""))
            await asyncio.gather(releaser, return_exceptions=True)
