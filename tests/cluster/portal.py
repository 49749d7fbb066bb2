"""A TCP port of the host's loopback that leads into the node's network namespace.

Started as ``nsenter --net=/run/netns/<node> python portal.py FD HOST PORT`` with a listening
socket (file descriptor ``FD``) that the parent bound on 127.0.0.1 in the host's namespace: a
socket keeps the namespace it was made in, while the connections this process opens to
``HOST:PORT`` are made inside the node's. So tests, kubectl and Helm on the host reach the
API server and Services of the node without a veth, a route or NAT on the host.

Hand-written because socat cannot span two network namespaces in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


async def _serve(fd: int, host: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        for w in (writer, up_writer):
            w.close()

    listener = socket.socket(fileno=fd)
    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        await server.serve_forever()


def main() -> None:
    fd, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    asyncio.run(_serve(fd, host, port))


if __name__ == "__main__":
    main()
