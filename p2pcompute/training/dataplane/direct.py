"""The direct TCP path: the reducer's listener and single-use tickets, the sender's connection to it, and the socket stream both use."""

# Why (docs/protocol.md "Direct TCP path"): p2pd itself (Go daemon, unix sockets, yamux, TLS) costs 1.7-4.9x
# gloo's whole round here, more than all the copies the raw frames save (see the package docstring). Group mates
# that reach each other at a loopback or private address therefore move the frames on a plain TCP connection
# instead, and keep the libp2p stream as the authenticated control channel: the sender's header says version 2,
# the reducer answers on the stream with a random single-use ticket and the port it listens on (bound to the
# loopback/private addresses of its libp2p host only); the sender connects to an address its libp2p connection to
# that reducer already uses (never one from the reply), presents the ticket, and tells the reducer on the stream
# which way its parts come. From then on the frames are exactly those of frames.py, on whichever channel was
# chosen; anything failing in between leaves them on the stream. The TCP frames are plaintext, like gloo's: only
# for peers that trust their LAN (P2PC_DIRECT_AVERAGING=0 or tuned_options(direct=False) turns it off).
# The setup frames are in frames.py, the limits and timeouts in settings.py.

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import logging
import secrets
import socket
import time
from typing import Optional, Sequence

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from p2pcompute.training.dataplane.frames import ACK, TICKET_BYTES
from p2pcompute.training.dataplane.settings import (
    ACCEPT_RETRY_DELAY,
    DIRECT_SETUP_TIMEOUT,
    MAX_DIRECT_SENDERS,
    MAX_STREAM_ONLY_PEERS,
    MAX_UNAUTHENTICATED,
    STREAM_OPEN_TIMEOUT,
    TICKET_READ_TIMEOUT,
    TICKET_TTL,
)

logger = logging.getLogger(__name__)

# Only addresses that cannot be reached from the internet: loopback, RFC 1918, IPv4 link-local, IPv6 unique
# local. (IPv6 link-local needs a zone our multiaddrs do not carry.) A host with no such address has no direct path.
DIRECT_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "::1/128", "fc00::/7"))


class StreamOnly(Exception):
    """A reducer refused our version-2 header: it speaks the protocol from before the direct path."""


@dataclasses.dataclass(eq=False)
class Ticket:
    """A single-use ticket a reducer handed to one sender of one group (DirectListener.issue)."""

    token: bytes
    sender: PeerID
    group_id: bytes
    expires: float  # time.monotonic()
    connection: asyncio.Future  # the SocketStream that presented it, once one did


class DirectPath:
    """One averager process's state for the direct path: its listener (None in client mode or without a
    loopback/private address) and the reducers that refused version 2."""

    def __init__(self, listener: Optional[DirectListener]):
        self.listener = listener
        self.stream_only: set[PeerID] = set()

    def stream_only_peer(self, peer_id: PeerID) -> None:
        if len(self.stream_only) >= MAX_STREAM_ONLY_PEERS:  # forget them all: they only cost one stream each again
            self.stream_only.clear()
        self.stream_only.add(peer_id)


class DirectListener:
    """The reducer's side of the direct path: TCP listeners on the loopback/private addresses of our libp2p host
    (one port for all), single-use tickets handed out on authenticated libp2p streams, and the connections that
    presented them. A connection is served by the stream handler that issued its ticket (see
    RawAllReduceMixin._serve_direct_or_stream), which also closes it."""

    def __init__(self, listeners: list[socket.socket], port: int):
        self.port = port
        self._listeners = listeners
        self._tickets: dict[bytes, Ticket] = {}  # not yet presented
        self._live: set[Ticket] = set()  # issued and not yet released (presented or not)
        self._admitting: set[asyncio.Task] = set()  # connections that have not presented a ticket yet
        self._accepting = [asyncio.create_task(self._accept(listener)) for listener in listeners]

    @classmethod
    async def start(cls, p2p: P2P) -> Optional[DirectListener]:
        """Listen on every loopback/private IP our libp2p host listens on; None if it has none (or on failure:
        the streams work without us)."""
        try:
            maddrs = await asyncio.wait_for(p2p.get_visible_maddrs(latest=True), STREAM_OPEN_TIMEOUT)
        except Exception as e:  # whatever p2pd says, the averager must start: it does so without a direct path
            logger.debug(f"No direct path: our listen addresses are unknown ({e!r})")
            return None
        hosts = list(dict.fromkeys(filter(None, map(direct_ip, maddrs))))
        listeners, port = [], 0
        for host in hosts:  # the first picks the port, the others take the same (the offer carries one port)
            try:
                listeners.append(listen(host, port))
            except OSError as e:
                logger.debug(f"No direct path at {host}:{port}: {e!r}")
                continue
            port = listeners[0].getsockname()[1]
        if not listeners:
            return None
        logger.debug(f"Direct path listening at port {port} of {', '.join(hosts)}")
        return cls(listeners, port)

    def issue(self, sender: PeerID, group_id: bytes) -> Optional[Ticket]:
        """A new ticket for `sender` in group `group_id`, or None if too many are live or it already has one."""
        if len(self._live) >= MAX_DIRECT_SENDERS or any(
                t.sender == sender and t.group_id == group_id for t in self._live):
            return None
        ticket = Ticket(secrets.token_bytes(TICKET_BYTES), sender, group_id, time.monotonic() + TICKET_TTL,
                        asyncio.get_running_loop().create_future())
        self._tickets[ticket.token] = ticket
        self._live.add(ticket)
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The ticket can no longer be presented; its connection, if any, is closed. Idempotent."""
        self._tickets.pop(ticket.token, None)
        self._live.discard(ticket)
        connection = presented(ticket)
        if connection is not None:
            connection.close()
        ticket.connection.cancel()  # no-op once it has a result

    async def close(self) -> None:
        """Stop listening, drop connections without a ticket yet and end those being served (their handlers
        see the connection end, and close it)."""
        tasks = [*self._accepting, *self._admitting]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self._listeners:
            listener.close()
        for ticket in list(self._live):
            connection = presented(ticket)
            if connection is not None:
                connection.abort()
            ticket.connection.cancel()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:  # e.g. out of file descriptors: wait instead of spinning
                logger.debug(f"Direct path: accept failed: {e!r}")
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if len(self._admitting) >= MAX_UNAUTHENTICATED:
                sock.close()
                continue
            task = asyncio.create_task(self._admit(SocketStream(sock)))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _admit(self, connection: SocketStream) -> None:
        """Read the connection's ticket: a live, unexpired, unused one hands it to its stream handler; anything
        else closes it at once."""
        try:
            token = bytes(await asyncio.wait_for(connection.readexactly(TICKET_BYTES), TICKET_READ_TIMEOUT))
            ticket = self._tickets.pop(token, None)  # single use: gone whatever happens next
            if ticket is None or time.monotonic() > ticket.expires or ticket.connection.done():  # (released)
                return
            ticket.connection.set_result(connection)  # before the acknowledgement: the sender's choice follows it
            connection, owned = None, ticket.connection.result()
            owned.write(ACK)
            await asyncio.wait_for(owned.drain(), TICKET_READ_TIMEOUT)  # on failure its handler closes it
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        finally:
            if connection is not None:
                connection.close()


def presented(ticket: Ticket) -> Optional[SocketStream]:
    """The connection that presented the ticket, if one did (its future is cancelled once it is released)."""
    future = ticket.connection
    return future.result() if future.done() and not future.cancelled() else None


class SocketStream:
    """One direct TCP connection, as the StreamReader/StreamWriter pair our frame code uses, on the event loop's
    sock_* calls. readexactly receives straight into a buffer kept for the connection (StreamReader copies every
    chunk into its buffer, then out again: 19% of the averager's time on streams was memmove), and drain hands
    the caller's own memory (a tensor's bytes) to the kernel, without queueing a copy.

    What readexactly returns is a view of that buffer, valid until the next read: every caller decodes, reduces
    or copies a frame before it reads the next one (one reader per connection)."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # a reply's 5-byte header must not wait for the peer's delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._buffer = bytearray()
        self._pending: collections.deque = collections.deque()  # the head is being sent while _draining
        self._draining = False
        self._broken = False  # a send was cut short: the byte stream is no longer framed, send nothing more
        self.transport = self  # serve_sender sets write buffer limits on its writer's transport

    async def readexactly(self, n: int) -> memoryview:
        if len(self._buffer) < n:
            self._buffer = bytearray(n)
        view = memoryview(self._buffer)[:n]
        loop, received = asyncio.get_running_loop(), 0
        while received < n:
            count = await loop.sock_recv_into(self._sock, view[received:])
            if count == 0:
                raise asyncio.IncompleteReadError(bytes(view[:received]), n)
            received += count
        return view

    async def read(self, n: int) -> bytes:
        return await asyncio.get_running_loop().sock_recv(self._sock, n)

    def write(self, data) -> None:
        """Queue `data`; with nothing queued, first send what the socket takes at once (as a transport does: an
        error status written just before close() goes out, and a frame's header leaves with its payload)."""
        if self._broken:
            return
        data = memoryview(data).cast("B")
        if not self._pending and not self._draining:
            with contextlib.suppress(OSError):  # socket buffer full (the rest waits for drain) or broken (drain raises)
                data = data[self._sock.send(data):]
            if not data:
                return
        self._pending.append(data)

    async def drain(self) -> None:
        loop = asyncio.get_running_loop()
        self._draining = True
        try:
            while self._pending:
                await loop.sock_sendall(self._sock, self._pending[0])
                self._pending.popleft()
        except BaseException:  # cancelled (timeout) or failed part-way: how much of the head went out is unknown
            self._broken = True
            self._pending.clear()
            raise
        finally:
            self._draining = False

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        """drain() already returns only once everything is in the kernel's socket buffer."""

    def abort(self) -> None:
        """End the connection under whoever is using it: their reads see its end, their writes fail."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Send what is still queued if the socket takes it at once (an error status), then close."""
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            for data in self._pending:
                self._sock.send(data)
        self._pending.clear()
        self._sock.close()


def listen(host: str, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(MAX_UNAUTHENTICATED)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def direct_ip(maddr: Multiaddr) -> Optional[str]:
    """The IP of `/ip4|ip6/<ip>/tcp/<port>[/p2p/<id>]` if it is loopback/private; None for anything else (a
    relayed address names the relay's IP, not the peer's)."""
    names = [protocol.name for protocol in maddr.protocols()]
    if len(names) < 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp" or any(n != "p2p" for n in names[2:]):
        return None
    ip = maddr.value_for_protocol(names[0])
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return ip if any(address in network for network in DIRECT_NETWORKS) else None


async def connection_hosts(p2p: P2P) -> dict[PeerID, tuple[str, ...]]:
    """Per connected peer, the loopback/private IPs of our host's open libp2p connections to it (empty on failure:
    every exchange then stays on its stream)."""
    try:
        peers = await asyncio.wait_for(p2p.list_peers(), STREAM_OPEN_TIMEOUT)
    except Exception as e:  # every exchange awaits this: whatever p2pd says must not fail the round
        logger.debug(f"No direct path this round: p2pd did not list its connections ({e!r})")
        return {}
    hosts: dict[PeerID, list[str]] = {}
    for info in peers:
        for maddr in info.addrs:
            ip = direct_ip(maddr)
            if ip is not None and ip not in hosts.setdefault(info.peer_id, []):
                hosts[info.peer_id].append(ip)
    return {peer_id: tuple(ips) for peer_id, ips in hosts.items() if ips}


async def connect_direct(hosts: Sequence[str], port: int, ticket: bytes) -> Optional[SocketStream]:
    """Present `ticket` at `port` of the first of `hosts` that accepts it, all within DIRECT_SETUP_TIMEOUT; None if
    none did (the reducer then serves us on the stream)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DIRECT_SETUP_TIMEOUT
    for host in hosts:
        sock = connection = None
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            connection = SocketStream(sock)
            async with asyncio.timeout_at(deadline):
                await loop.sock_connect(sock, (host, port))
                connection.write(ticket)
                await connection.drain()
                if bytes(await connection.readexactly(len(ACK))) == ACK:
                    return connection
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            logger.debug(f"Direct path to {host}:{port} failed: {e!r}")
        if sock is not None:
            sock.close()
        if loop.time() >= deadline:
            break
    return None
