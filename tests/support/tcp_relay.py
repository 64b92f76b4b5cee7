"""A TCP relay a test can cut and restore: a real network partition from the endpoints' point of view.

Each relay listens on a loopback port and pipes every accepted connection to one target. ``cut()``
closes the connections it carries and refuses new ones (accepted, then closed at once, as a dropped
route looks to the peer); ``restore()`` lets connections through again. It runs on its own event loop
thread, so the processes or loops on either side see nothing but sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class Relay:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` until cut."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target_host: str, target_port: int) -> None:
        self._loop = loop
        self._target = (target_host, target_port)
        self._open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while self._open and (data := await reader.read(1 << 16)):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _cut(self) -> None:
        self._open = False
        for writer in list(self._writers):
            with contextlib.suppress(OSError):
                writer.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._cut)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_open", True)


class Relays:
    """One relay per ordered pair ``(dialer, listener)``; cut the links between two sides at once."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tcp-relays", daemon=True)
        self._thread.start()
        self.pairs: dict[tuple[int, int], Relay] = {}

    def add(self, dialer: int, listener: int, host: str, port: int) -> int:
        """A relay for ``dialer``'s connections to ``listener`` at ``host:port``; its own port."""
        relay = Relay(self.loop, host, port)
        asyncio.run_coroutine_threadsafe(relay.start(), self.loop).result(10)
        self.pairs[(dialer, listener)] = relay
        return relay.port

    def partition(self, *sides: set[int]) -> None:
        """Cut every link between ranks of different ``sides``."""
        for (a, b), relay in self.pairs.items():
            if not any(a in side and b in side for side in sides):
                relay.cut()

    def heal(self) -> None:
        for relay in self.pairs.values():
            relay.restore()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
