"""The data plane's settings: every limit and timeout it uses (each with why that number), tuned_options(), direct_enabled()."""

from __future__ import annotations

import os
from typing import Optional

from hivemind.compression import CompressionBase

# ---- the all-reduce -----------------------------------------------------------------------------------
# Part size: with raw frames the per-part cost is one stream frame, so parts can be large. 25M floats,
# 2 peers: 1 MiB and 4 MiB parts both 0.30 s, 16 MiB 0.35 s (less overlap); 4 MiB still splits a 25M-float
# tensor into 12 parts per peer, enough to overlap sending, reducing and replying.
PART_SIZE_BYTES = 4 * 2**20
# A peer silent for this long between two frames is dropped from the round (a reducer gets twice as long).
# hivemind defaults it to matchmaking_time, which on a loaded 2-core box cut CPU-bound rounds in half.
# Frame gaps here are < 1 s on loopback and ~(group size - 1) x part size / bandwidth on a slow link
# (2 x 1.7 s for 3 peers at 20 Mbit/s). A peer killed mid-round is usually noticed at once (its stream
# closes), but p2pd does not always reset the streams of a vanished peer: then this bounds the stall.
NEXT_CHUNK_TIMEOUT = 15.0
# Matchmaking: a group of peers on one LAN/loopback forms in ~0.05-0.2 s; 2 s leaves room for a loaded
# machine, and request_timeout must stay below it (hivemind stalls otherwise, see DESIGN.md).
MIN_MATCHMAKING_TIME = 2.0
REQUEST_TIMEOUT = 1.0
# Upper bound on a whole all-reduce once the group is formed (25M floats take < 2 s here; slow links
# are the caller's to raise it for: 25M floats over 20 Mbit/s take ~80 s).
ALLREDUCE_TIMEOUT = 120.0
# A reducer waits this long for a sender's header before closing the stream.
HEADER_TIMEOUT = 10.0
# A sender's stream may arrive before this peer has set up the round (load balancing, tensor lock); hivemind
# waits without a bound, we wait this long (a round that starts later than this is not going to finish), and only
# while a group may still come to us (membership.py).
GROUP_WAIT_TIMEOUT = 30.0
# How often that wait looks again: a legitimate early stream waits for at most one more poll after its round
# registers (milliseconds after the leader's message), a stream for a round we are not in is refused within one.
GROUP_POLL = 0.02
# A leader keeps a join stream open after its last message until the follower closes it (it does as soon as it
# has read the message: milliseconds), at most this long; a follower that vanished meanwhile only costs an idle
# handler for this long. Closing at once let p2pd's reset overtake the message (membership.py).
VERDICT_LINGER = 5.0
# Every live group mate opens its streams within milliseconds of the group forming; one that has not
# started sending after this long (it died during matchmaking) is dropped then, not after the (longer)
# gap allowed between two frames of a slow link. hivemind uses next_chunk_timeout for both.
SENDER_START_TIMEOUT = 5.0
# Opening a stream to a group mate that died after matchmaking makes p2pd dial it; bounded by this.
STREAM_OPEN_TIMEOUT = 5.0
# A reducer that refused a stream reads (and drops) the sender's input for at most this long before closing it:
# p2pd resets a stream closed with input unread (a sender writes its parts right after the header), and the reset
# can overtake the status, so the sender would see a cut stream instead.
CLOSE_LINGER = 2.0

# ---- the direct path (direct.py) ---------------------------------------------------------------------
# Measured (bench_training.py (a), 25M float32, 127.0.0.1, 2 / 4 peers): libp2p streams 0.32 / 0.88 s per round,
# direct TCP 0.067 / 0.21 s, gloo 0.060 / 0.14 s. On by default; P2PC_DIRECT_AVERAGING=0 (or
# tuned_options(direct=False)) turns it off.
DIRECT_ENV = "P2PC_DIRECT_AVERAGING"
# A ticket must be presented this soon after it was sent: on a LAN the sender connects within milliseconds; the
# same bound is the reducer's wait for the sender's choice (the sender decides within DIRECT_SETUP_TIMEOUT).
TICKET_TTL = 5.0
# Sender: connecting, presenting the ticket and reading its acknowledgement, every candidate address together. A
# reducer that is slower than this on a LAN is no faster than the stream, which is used instead.
DIRECT_SETUP_TIMEOUT = 2.0
# Reducer: an accepted connection must present its ticket within this, or it is closed.
TICKET_READ_TIMEOUT = 2.0
# Reducer: direct senders at once (tickets handed out and not yet released, each at most one connection). Only a
# non-banned group mate gets a ticket, one per round; mates beyond this send on their streams.
MAX_DIRECT_SENDERS = 64
# Reducer: accepted connections that have not yet presented a ticket. Anyone on the LAN can connect; beyond this
# new connections are closed at once (honest senders then use their streams), so none can exhaust us.
MAX_UNAUTHENTICATED = 16
# Sender: how many reducers that answered version 2 with PROTOCOL_VIOLATION (a version without the direct path)
# we remember, so that we send them version 1 at once next time.
MAX_STREAM_ONLY_PEERS = 1024
# A listener whose accept() fails (out of file descriptors) tries again after this, instead of spinning.
ACCEPT_RETRY_DELAY = 0.5


def tuned_options(*, compression: Optional[CompressionBase] = None, part_size_bytes: int = PART_SIZE_BYTES,
                  min_matchmaking_time: float = MIN_MATCHMAKING_TIME, request_timeout: float = REQUEST_TIMEOUT,
                  next_chunk_timeout: float = NEXT_CHUNK_TIMEOUT,
                  allreduce_timeout: float = ALLREDUCE_TIMEOUT, direct: Optional[bool] = None) -> dict:
    """Every keyword argument of a DecentralizedAverager that we choose instead of inheriting hivemind's.
    `direct` (our averagers only): use the direct TCP path with loopback/private group mates; None leaves it to
    the P2PC_DIRECT_AVERAGING environment variable (default on)."""
    options = dict(part_size_bytes=part_size_bytes, min_matchmaking_time=min_matchmaking_time,
                   request_timeout=request_timeout, next_chunk_timeout=next_chunk_timeout,
                   allreduce_timeout=allreduce_timeout)
    if compression is not None:
        options["compression"] = compression
    if direct is not None:  # absent otherwise: hivemind's own averager classes would refuse the keyword
        options["direct"] = direct
    return options


def direct_enabled(direct: Optional[bool] = None) -> bool:
    """Whether our averager uses the direct TCP path: the keyword if given, else P2PC_DIRECT_AVERAGING (on
    unless 0/false/no/off)."""
    if direct is not None:
        return bool(direct)
    return os.environ.get(DIRECT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
