"""A hostile group mate on our raw all-reduce data plane (p2pcompute.training.dataplane): 2 honest TunedAverager
peers and 1 peer whose sender side breaks the protocol, all real processes on 127.0.0.1.

Per round the hostile peer, a group member (target and min group size 3), sends to each of its 2 remote reducers:
  bad_length  its part 0 correctly, then a part frame 4 bytes too long (to one reducer) or announcing 4 GiB (other)
  bad_magic   a header with a wrong magic (to one reducer) or 64 bytes of 0xff (to the other)
  duplicate   a valid header, then (before any part) a second stream for the same group with its parts set to 1000,
              then its real parts on the first stream
  bad_weight  a NaN weight (to one reducer) or -1 (to the other), followed by its parts
and a last round is clean. Its own reducing stays honest, so its share of the vector always holds the mean of all
three. What each honest reducer must do (docs/protocol.md "Averaging data plane"): refuse and ban the sender at once
(bad_length after part 0, whose mean already counted it; bad_weight), ban it after SENDER_START_TIMEOUT (bad_magic:
the stream never reached the round), or refuse only the second stream (duplicate: the first one counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from hivemind.proto import averaging_pb2
from peer_procs import loopback_dht, peer_main, run_peers, run_round, running, write_atomic

from p2pcompute.training.dataplane import TunedAverager, averagers, tuned_options
from p2pcompute.training.dataplane.frames import MAGIC, PART, REPLY, STATUS_OK, VERSION, encode_header, raw_bytes
from p2pcompute.training.dataplane.runner import RawAllReduceRunner
from p2pcompute.training.dataplane.settings import SENDER_START_TIMEOUT, STREAM_OPEN_TIMEOUT

PEERS, HOSTILE = 3, 2  # ranks 0 and 1 are honest
WEIGHTS = (1.0, 2.0, 1.5)
SHAPES = [(50_001,), (7, 13), (3,)]
PART_SIZE_BYTES = 16 * 1024  # 4096 floats: 15 parts, >= 4 in every peer's share
ATTACKS = ("bad_length", "bad_magic", "duplicate", "bad_weight")
ROUNDS = (*ATTACKS, "clean")
HOSTILE_OFFSET = 10.0  # the hostile inputs sit far from the honest ones: counting them or not is unmistakable
DUPLICATE_VALUE = 1000.0  # what the refused second stream sends
DUPLICATE_DELAY = 0.5  # between the first stream's header and the second stream
NEXT_CHUNK_TIMEOUT = 15.0  # sender_timeout of every peer; the reducer's timeout is twice that
# an honest all-reduce ends at once when the sender is refused, after SENDER_START_TIMEOUT when its stream never
# reaches the round; not after a whole sender_timeout (the defence missed) or more
ALLREDUCE_BOUND = SENDER_START_TIMEOUT + 5.0
STEP_TIMEOUT = 40.0  # matchmaking of one round
REPLY_TIMEOUT = 2 * NEXT_CHUNK_TIMEOUT + 5.0  # the hostile peer's every read
PEER_TIMEOUT = 150.0  # the whole run of a peer (5 rounds, one of them >= 5 s); normally ~30 s
ATOL = 1e-5


def peer_tensors(rank: int, round_index: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * round_index + rank)
    offset = HOSTILE_OFFSET if rank == HOSTILE else 0.0
    return [torch.randn(shape, generator=generator) + offset for shape in SHAPES]


# ---- the hostile peer -------------------------------------------------------------------------------------------
def _frame(part: torch.Tensor) -> bytes:
    return PART.pack(part.numel() * part.element_size()) + bytes(raw_bytes(part))


class HostileRunner(RawAllReduceRunner):
    """Reduces honestly; as a sender, breaks the protocol as its mode says, and notes the reducers' statuses."""

    def __init__(self, *, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode
        self.remote_reducers = [peer_id for peer_id, parts in zip(self.ordered_peer_ids, self.parts_by_peer)
                                if parts and peer_id != self.peer_id]
        self.statuses: dict[int, list] = {}  # remote reducer (in group order) -> per stream: its reply statuses

    def record(self) -> dict:
        return {"layout": [[peer_id == self.peer_id, [part.numel() for part in parts]]
                           for peer_id, parts in zip(self.ordered_peer_ids, self.parts_by_peer)],
                "statuses": [self.statuses.get(nth) for nth in range(len(self.remote_reducers))]}

    async def _exchange_remote(self, peer_id, parts, infos, applied: list[int]) -> None:
        if self.mode == "clean":
            return await super()._exchange_remote(peer_id, parts, infos, applied)
        nth = self.remote_reducers.index(peer_id)
        attack = getattr(self, f"_send_{self.mode}")
        try:
            self.statuses[nth] = await attack(peer_id, parts, nth)
        except Exception as e:  # noted, for the test to report
            self.statuses[nth] = [repr(e)]

    @contextlib.asynccontextmanager
    async def _stream(self, peer_id):
        _, reader, writer = await asyncio.wait_for(self._p2p.call_binary_stream_handler(peer_id, self.protocol),
                                                   STREAM_OPEN_TIMEOUT)
        try:
            yield reader, writer
        finally:
            writer.close()

    def _header(self, weight: float | None = None, magic: bytes = MAGIC) -> bytes:
        weight = self.weight if weight is None else weight
        return encode_header(VERSION, self.codec, self.group_id, weight, magic)

    @staticmethod
    async def _statuses(reader: asyncio.StreamReader, count: int) -> list:
        """The status of each reply up to the first error (reply payloads are read and dropped); "eof" if cut."""
        statuses = []
        for _ in range(count):
            try:
                status, length = REPLY.unpack(await asyncio.wait_for(reader.readexactly(REPLY.size), REPLY_TIMEOUT))
            except asyncio.IncompleteReadError:
                return [*statuses, "eof"]
            statuses.append(status)
            if status != STATUS_OK:
                break
            await asyncio.wait_for(reader.readexactly(length), REPLY_TIMEOUT)
        return statuses

    async def _send_bad_length(self, peer_id, parts, nth: int) -> list:
        if nth == 0:  # 4 bytes too many, all sent
            size = parts[1].numel() * parts[1].element_size() + 4
            bad_frame = PART.pack(size) + bytes(size)
        else:  # 4 GiB announced, nothing follows: must be refused before the reducer tries to read it
            bad_frame = PART.pack(2**32 - 1)
        async with self._stream(peer_id) as (reader, writer):
            writer.write(self._header() + _frame(parts[0]) + bad_frame)
            return [await self._statuses(reader, len(parts))]

    async def _send_bad_magic(self, peer_id, parts, nth: int) -> list:
        async with self._stream(peer_id) as (reader, writer):
            writer.write(self._header(magic=b"EVIL") if nth == 0 else b"\xff" * 64)
            return [await self._statuses(reader, len(parts))]

    async def _send_duplicate(self, peer_id, parts, nth: int) -> list:
        async with self._stream(peer_id) as (reader, writer):
            writer.write(self._header())
            await asyncio.sleep(DUPLICATE_DELAY)  # the reducer takes the first stream in
            async with self._stream(peer_id) as (second_reader, second_writer):
                second_writer.write(self._header() + b"".join(_frame(torch.full_like(p, DUPLICATE_VALUE))
                                                              for p in parts))
                second = await self._statuses(second_reader, len(parts))
            writer.write(b"".join(_frame(part) for part in parts))
            return [await self._statuses(reader, len(parts)), second]

    async def _send_bad_weight(self, peer_id, parts, nth: int) -> list:
        async with self._stream(peer_id) as (reader, writer):
            writer.write(self._header(weight=math.nan if nth == 0 else -1.0) + b"".join(map(_frame, parts)))
            return [await self._statuses(reader, len(parts))]


class HostileAverager(TunedAverager):
    """A TunedAverager whose all-reduce runs a HostileRunner in the mode of ROUNDS[round_index] (set before each
    step); the runner's layout and statuses go to <record_dir>/hostile-<mode>.json."""

    def __init__(self, *args, record_dir: Path, **kwargs):
        # shared with the averager process, which hivemind's __init__ forks
        self.round_index = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.record_dir = record_dir
        super().__init__(*args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        mode, runners = ROUNDS[int(self.round_index[0])], []

        def make_runner(**runner_kwargs) -> HostileRunner:
            runners.append(HostileRunner(mode=mode, **runner_kwargs))
            return runners[-1]

        try:  # this process is the hostile peer only: its runner class is ours
            with mock.patch.object(averagers, "RawAllReduceRunner", make_runner):
                return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
        finally:  # one record per all-reduce (a retried round would have several)
            path = self.record_dir / f"hostile-{mode}.json"
            records = json.loads(path.read_text()) if path.exists() else []
            write_atomic(path, json.dumps(records + [runner.record() for runner in runners]))


# hivemind names an averager's RPCs after its class (`<prefix>::<class name>.rpc_join_group`): under its own name
# the hostile peer could not even join a group of TunedAverager peers
HostileAverager.__name__ = TunedAverager.__name__


# ---- the run: 3 processes, all rounds -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{round: {"peers": [each peer's result], "hostile": [the hostile runner's record per group]}}."""
    directory = tmp_path_factory.mktemp("averaging_hostile")
    run_peers(__file__, PEERS, directory, PEER_TIMEOUT)
    return {name: {"peers": [torch.load(directory / f"{name}-{rank}.pt", weights_only=True) for rank in range(PEERS)],
                   "hostile": json.loads((directory / f"hostile-{name}.json").read_text())}
            for name in ROUNDS}


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _mean(round_index: int, ranks) -> torch.Tensor:
    return sum(WEIGHTS[r] * _flat(peer_tensors(r, round_index)) for r in ranks) / sum(WEIGHTS[r] for r in ranks)


def _counts_hostile(mode: str, reducer_is_hostile: bool, part_index: int) -> bool:
    """Whether the hostile peer's input is in the mean of this part (the reducer's part_index-th)."""
    if reducer_is_hostile or mode in ("duplicate", "clean"):
        return True
    return mode == "bad_length" and part_index == 0  # reduced before the bad frame was read


def expected(mode: str, layout) -> torch.Tensor:
    """The flat vector every honest peer must hold after round `mode` with the hostile runner's part layout."""
    index = ROUNDS.index(mode)
    honest, everyone = _mean(index, range(HOSTILE)), _mean(index, range(PEERS))
    counted = torch.cat([torch.full((size,), _counts_hostile(mode, is_hostile, part_index))
                         for is_hostile, sizes in layout for part_index, size in enumerate(sizes)])
    assert counted.numel() == everyone.numel()
    return torch.where(counted, everyone, honest)


def _the_group(results, mode: str):
    records = results[mode]["hostile"]
    assert len(records) == 1, f"{mode}: the hostile peer ran {len(records)} all-reduces"
    return records[0]


# ---- tests --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ROUNDS)
def test_honest_peers_complete_the_round_in_time(results, mode):
    for rank in range(HOSTILE):
        result = results[mode]["peers"][rank]
        assert result["group_size"] == PEERS, f"{mode}: the hostile peer was not in the group"
        assert result["failed_fraction"] == 0.0  # every reducer answered every honest part
        assert result["allreduce_s"] < ALLREDUCE_BOUND, f"{mode}: all-reduce took {result['allreduce_s']:.1f} s"


@pytest.mark.parametrize("mode", ROUNDS)
def test_honest_peers_hold_the_mean_the_protocol_defines(results, mode):
    layout = _the_group(results, mode)["layout"]
    assert len(layout) == PEERS and all(len(sizes) >= 2 for _, sizes in layout)  # bad_length needs 2 parts each
    want = expected(mode, layout)
    honest = [_flat(results[mode]["peers"][rank]["tensors"]) for rank in range(HOSTILE)]
    for got in honest:
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert torch.equal(honest[0], honest[1])  # every reducer sent each of them the same mean


def test_the_clean_round_after_the_attacks_is_the_exact_mean_on_every_peer(results):
    want = _mean(ROUNDS.index("clean"), range(PEERS))
    for result in results["clean"]["peers"]:
        torch.testing.assert_close(_flat(result["tensors"]), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ATTACKS)
def test_reducers_answer_the_hostile_sender_with_the_documented_status(results, mode):
    # the status, not a cut stream, although the hostile peer's parts are still in flight (see CLOSE_LINGER)
    record = _the_group(results, mode)
    remote_sizes = [sizes for is_hostile, sizes in record["layout"] if not is_hostile]
    violation = averaging_pb2.PROTOCOL_VIOLATION
    for sizes, streams in zip(remote_sizes, record["statuses"], strict=True):
        want = {"bad_length": [[STATUS_OK, violation]],
                "bad_magic": [[violation]],
                "duplicate": [[STATUS_OK] * len(sizes), [averaging_pb2.DUPLICATE_PEER_ID]],
                "bad_weight": [[violation]]}[mode]
        assert streams == want


# ---- one peer (run by the fixture as a subprocess) ----------------------------------------------------------------
def _peer(rank: int, directory: Path) -> None:
    with loopback_dht(rank, directory) as dht:
        options = dict(prefix="test_hostile", target_group_size=PEERS, min_group_size=PEERS, start=True,
                       **tuned_options(part_size_bytes=PART_SIZE_BYTES, next_chunk_timeout=NEXT_CHUNK_TIMEOUT))
        if rank == HOSTILE:
            averager = HostileAverager(peer_tensors(rank, 0), dht, record_dir=directory, **options)
        else:
            averager = TunedAverager(peer_tensors(rank, 0), dht, **options)
        with running(averager):
            for index, name in enumerate(ROUNDS):  # the same averagers throughout: each round starts afresh
                with averager.get_tensors() as tensors:
                    for tensor, value in zip(tensors, peer_tensors(rank, index)):
                        tensor.copy_(value)
                if rank == HOSTILE:
                    averager.round_index[0] = index
                run_round(averager, directory, name, rank, PEERS, weight=WEIGHTS[rank], timeout=STEP_TIMEOUT)


if __name__ == "__main__":
    peer_main(_peer)
