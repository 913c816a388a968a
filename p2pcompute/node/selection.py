"""Run selection: which announced run a user means (id prefix or name) and which one this node should train."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from p2pcompute.errors import NotFound, UsageError

if TYPE_CHECKING:
    from p2pcompute.runs.manifest import SignedManifest

MIN_RUN_PREFIX = 4  # hex digits of a run id a user must give to pick it (like short git hashes)


def matching_runs(runs: Sequence["SignedManifest"], wanted: str) -> dict[bytes, "SignedManifest"]:
    """The one run-prefix rule: runs named exactly `wanted`, or whose id starts with it (>= MIN_RUN_PREFIX
    hex digits, any case), by run id."""
    prefix = wanted.lower()
    return {r.run_id: r for r in runs
            if r.manifest.name == wanted or (len(wanted) >= MIN_RUN_PREFIX and r.run_id.hex().startswith(prefix))}


def check_run_ref(wanted) -> str:
    """`wanted` if it can name a run (a non-empty string), else UsageError."""
    if not isinstance(wanted, str) or not wanted:
        raise UsageError(f"give a run id (or its first {MIN_RUN_PREFIX}+ hex digits) or the run's name")
    return wanted


def find_run(runs: Sequence["SignedManifest"], wanted: str) -> "SignedManifest":
    """The run a user names among the announced `runs`; raises UsageError (no or ambiguous name) or NotFound."""
    matches = matching_runs(runs, check_run_ref(wanted))
    if not matches:
        raise NotFound(f"no run {wanted!r} is announced in the swarm")
    if len(matches) > 1:
        raise UsageError(f"{wanted!r} matches {len(matches)} runs; give more of the run id")
    return next(iter(matches.values()))


def choose_run(runs: Sequence["SignedManifest"], device: str, memory_bytes: int, wanted: str = "",
               skip: frozenset[bytes] = frozenset()) -> tuple["SignedManifest | None", str]:
    """The run to join and why: the one asked for (id prefix or exact name), else the largest model among
    the runs this hardware can take (small runs can be trained by anyone; big ones need the big machines)."""
    candidates = [r for r in runs if r.run_id not in skip]
    if wanted:
        matches = list(matching_runs(candidates, wanted).values())
        if not matches:
            return None, f"run {wanted!r} is not announced in the swarm (yet)"
        if len(matches) > 1:
            return None, f"run {wanted!r} is ambiguous: give more of the run id"
        why_not = matches[0].manifest.unmet(device, memory_bytes)
        return (None, why_not) if why_not else (matches[0], "asked for")
    fitting = [r for r in candidates if r.manifest.unmet(device, memory_bytes) is None]
    if not fitting:
        if candidates:
            return None, "no announced run fits this node"
        return None, "every announced run has ended here" if runs else "no run is announced in the swarm"
    best = max(fitting, key=lambda r: (r.manifest.parameter_count, r.run_id))
    return best, "best fit for this hardware"
