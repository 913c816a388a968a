"""Every failure a user can meet, one class each; the CLI maps them to one line and an exit code."""

from __future__ import annotations


class P2PCError(Exception):
    """Base of all expected errors. The CLI prints `str(err)` on one line and exits with `exit_code`."""

    exit_code = 1


class ConfigError(P2PCError):
    """A config file, flag or environment variable has a bad value (message names the key)."""

    exit_code = 12


class UsageError(P2PCError):
    """A command-line argument is malformed."""

    exit_code = 2


class KeyFileError(P2PCError):
    """The identity key file is missing, malformed or has unsafe permissions."""

    exit_code = 3


class NodeNotRunning(P2PCError):
    """The control API of a node could not be reached."""

    exit_code = 4


class ControlAPIError(P2PCError):
    """The node's control API refused or failed a request."""

    exit_code = 14


class SwarmError(P2PCError):
    """The DHT/libp2p host could not start or could not reach any bootstrap peer."""

    exit_code = 5


class InvalidMessage(P2PCError):
    """Bytes from the network or a file do not decode to a well-formed record."""

    exit_code = 6


class InvalidSignature(InvalidMessage):
    """A signature or public key fails the pinned Ed25519 rule."""

    exit_code = 16


class InvalidEntry(InvalidMessage):
    """A ledger entry fails validation (the message names the reason)."""

    exit_code = 17


class ProtocolError(InvalidMessage):
    """A peer broke one of our protocols, refused a request or did not answer in time (p2pcompute.protocol).

    `malformed`: the peer sent bytes that are not a well-formed message of the protocol (its fault, and a
    reason to ban it), as opposed to a refusal, a timeout or an unreachable peer."""

    exit_code = 18

    def __init__(self, message: str, *, malformed: bool = False):
        super().__init__(message)
        self.malformed = malformed


class InvalidManifest(P2PCError):
    """A run manifest fails validation (the message names the field)."""

    exit_code = 13


class NotFound(P2PCError):
    """A requested object (run, entry, peer) does not exist where it was looked for."""

    exit_code = 7


class StoreError(P2PCError):
    """The ledger store is unreadable or corrupt."""

    exit_code = 8


class DatasetUnavailable(P2PCError):
    """A run's dataset cannot be opened on this machine (file missing, hash mismatch, other Python stdlib)."""

    exit_code = 9


class TrainingError(P2PCError):
    """The trainer could not start or stopped on an unrecoverable error (the message names the cause)."""

    exit_code = 10


class MissingDependency(P2PCError):
    """A ledger entry names an entry or a run this replica does not hold yet; it may become valid later.

    `key` names what is missing: ("entry", id) or ("run", publisher public key, run id).
    """

    exit_code = 15

    def __init__(self, message: str, key: tuple):
        super().__init__(message)
        self.key = key


class LedgerInvalid(StoreError):
    """Offline verification of a ledger replica found bad entries or derived tables that disagree."""

    exit_code = 11


class NodeProcessError(P2PCError):
    """A node subprocess started by `p2pc demo` or a test harness exited early or was not ready in time."""

    exit_code = 19


class TimedOut(P2PCError):
    """Something awaited (training progress, credits, discovery in `p2pc demo`) did not happen in time."""

    exit_code = 20


class NodeAlreadyRunning(P2PCError):
    """A node or bootstrap peer already runs on this data dir (or processes it left still hold its lock)."""

    exit_code = 21
