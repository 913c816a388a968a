"""Our averaging data plane: hivemind averagers whose all-reduce sends raw tensor frames on a libp2p stream (or direct TCP), with tuned settings, round timing and traffic counters.

Why (measured on the 2-core dev box, see docs/benchmarks.md "Training / averaging"): hivemind's
all-reduce moves every 512 KB part as a protobuf message; on the way each part is copied ~9 times
in Python (tobytes, protobuf field, SerializeToString, stream buffer, bytes(), ParseFromString,
.buffer, bytearray, torch.cat) and its results are concatenated on the event loop. Ours keeps
hivemind's matchmaking, load balancing, part split (TensorPartContainer), reduction and sender
banning (TensorPartReducer, AllReduceRunner), and replaces only the data plane:

* one binary libp2p stream per (sender, reducer) pair on the node's own host (no second stack);
* parts are written as raw bytes straight from the averaged tensors' shared memory (no copy for
  "none"), fp16 parts are a single cast; any other hivemind codec (8-bit, adaptive) travels as its
  serialized runtime_pb2.Tensor in the same framing;
* results are applied in place, part by part, as they arrive (no torch.cat, no full-size delta);
* without compression the reducer returns the average itself, so every peer ends up bit-identical;
  with a lossy codec it returns (average - what it decoded from you), as hivemind does, so codec
  error lands on the difference, not on the values.

Modules, lowest first: settings (limits, timeouts, tuned_options), frames (wire format and part codecs), direct
(the direct TCP path), runner (one group's all-reduce), averagers (the hivemind averager classes). The wire
format is specified in docs/protocol.md "Averaging data plane".
"""

from p2pcompute.training.dataplane.averagers import (
    RawAllReduceMixin,
    RoundStats,
    RoundTimingMixin,
    Traffic,
    TunedAverager,
    TunedGradientAverager,
    TunedStateAverager,
)
from p2pcompute.training.dataplane.settings import direct_enabled, tuned_options

__all__ = [
    "RawAllReduceMixin",
    "RoundStats",
    "RoundTimingMixin",
    "Traffic",
    "TunedAverager",
    "TunedGradientAverager",
    "TunedStateAverager",
    "direct_enabled",
    "tuned_options",
]
