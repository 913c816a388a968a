"""Audits by recomputation: a real trainer's work is recomputable from (manifest, peer, epoch, steps, start state), an
honest recomputation in another process with another thread count passes, every kind of fabrication fails, selection
is verifiable, and reports are re-checkable offline (tampering is named)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2pcompute import crypto
from p2pcompute.credits.claims import Claim
from p2pcompute.credits.audit import (MAX_SPOT_STEPS, TOLERANCE_PPM, AuditReport, StepReveal, WorkCommitment,
                                      audit_ticket, is_selected, judge, spot_steps, verify_ticket)
from p2pcompute.errors import InvalidMessage, InvalidSignature
from p2pcompute.identity import Identity, peer_id_bytes
from p2pcompute.runs.datasets import batch_for
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.specs import mlp_synthetic_spec
from p2pcompute.swarm.dht import start_dht
from p2pcompute.training.trainer import Trainer, TrainerOptions
from p2pcompute.runs.optimizers import optimizer_factory
from p2pcompute.training.work import (LocalWorkRecorder, Recomputer, StartStates, WorkRecorder, audit_claim,
                                     recheck_report, state_digest)

WORKER = Path(__file__).resolve().parent / "audit_worker.py"
CHECKOUT = Path(__file__).resolve().parent.parent
LR = "0.05"
EPOCHS = 4
STEPS_PER_EPOCH = 12
ALWAYS = 10**6  # audit rate in ppm: every claim
PUBLISHER = bytes(range(32))
DEADLINE = 120.0  # seconds for the training run and for the worker process on a loaded 2-core machine


@dataclasses.dataclass
class Run:
    manifest: Manifest
    trainer: Trainer
    peer: bytes
    auditor: Identity


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A lone peer's real training run (gradients mode, plain SGD so that each update is exactly -lr x the averaged
    gradient), finished; its trainer still answers for its recorded work."""
    root = tmp_path_factory.mktemp("audit")
    manifest = Manifest.from_toml(mlp_synthetic_spec(
        "audit-test", batch_size_per_step=16, target_batch_size=16 * STEPS_PER_EPOCH, in_features=6, hidden=[16],
        out_features=2, seed=5, optimizer="sgd", lr=LR, max_epochs=EPOCHS))
    yield finished_run(root, manifest, TrainerOptions(device="cpu", work_history=8))


def finished_run(root: Path, manifest: Manifest, options: TrainerOptions) -> Run:
    identity = Identity.load_or_create(root / "node" / "identity.key")
    dht = start_dht(identity, listen=["/ip4/127.0.0.1/tcp/0"])
    trainer = Trainer(dht, manifest, identity, options)
    try:
        with trainer:
            assert trainer.wait(DEADLINE)
    finally:
        dht.shutdown()
    assert trainer.status().status == "finished"
    return Run(manifest, trainer, identity.public_key, Identity.load_or_create(root / "auditor" / "identity.key"))


def subject_of(commitment: WorkCommitment) -> bytes:
    return crypto.digest(b"test claim" + commitment.digest)  # stands for the payout / claim id


def claim_for(run: Run, commitment: WorkCommitment, samples: int | None = None) -> Claim:
    return Claim(run.manifest.run_id, PUBLISHER, commitment.epoch, commitment.peer,
                 commitment.samples if samples is None else samples, b"", commitment.digest)


def audit(run: Run, commitment: WorkCommitment, reveal, samples: int | None = None, spot: int = 8) -> AuditReport:
    state = run.trainer.start_state(commitment.epoch)[1]
    claim = claim_for(run, commitment, samples)
    report = audit_claim(Recomputer(run.manifest), state, claim, commitment, subject_of(commitment), run.auditor,
                         ALWAYS, reveal, spot=spot)
    report = AuditReport.from_wire(report.to_wire())
    report.check(claim)  # whatever the verdict, anyone can re-check it
    recheck_report(Recomputer(run.manifest), state, report, claim)
    return report


def test_recomputation_matches_what_the_trainer_accumulated(run):
    """theta_{E+1} = theta_E - lr x (mean of the step gradients recomputed from (manifest, peer, E, steps, theta_E)):
    the recomputation is what hivemind accumulated and applied, and the commitment counts the trainer's samples."""
    recomputer = Recomputer(run.manifest)
    contributions = run.trainer.contributions()
    checked = 0
    for epoch in range(1, EPOCHS - 1):
        commitment = run.trainer.work_commitment(epoch)
        digest, start = run.trainer.start_state(epoch)
        _, after = run.trainer.start_state(epoch + 1)
        # (at least the target: a loaded machine may let the peer take a few steps more before its epoch ends)
        assert commitment.samples == contributions[epoch] >= run.manifest.target_batch_size
        assert commitment.state_digest == digest == recomputer.load(start)
        grads = recomputer.contribution(run.peer, epoch, commitment.steps)
        for before, new, grad in zip(start, after, grads):
            torch.testing.assert_close(new, before - float(LR) * grad, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == EPOCHS - 2


def test_honest_work_passes_an_audit_recomputed_elsewhere(run, tmp_path):
    """The trainer's own commitment (threads: this process uses 1) against a recomputation in another process with
    2 threads: within the fp32 tolerance, and the full audit passes and re-checks."""
    torch.set_num_threads(1)
    epoch = 2
    commitment = run.trainer.work_commitment(epoch)
    steps = list(range(commitment.steps))
    (tmp_path / "manifest").write_bytes(run.manifest.to_wire())
    torch.save(run.trainer.start_state(epoch)[1], tmp_path / "state.pt")
    subprocess.run([sys.executable, str(WORKER), str(tmp_path / "manifest"), str(tmp_path / "state.pt"),
                    commitment.to_wire().hex(), ",".join(map(str, steps)), "2", str(tmp_path / "out")],
                   check=True, timeout=DEADLINE, env={"PYTHONPATH": str(CHECKOUT)})
    data = (tmp_path / "out").read_bytes()
    elsewhere = [data[i:i + 128] for i in range(0, len(data), 128)]
    reveals = run.trainer.reveal(epoch, steps)
    for r in reveals:
        r.check(commitment)
    verdict, reason = judge(commitment, commitment.samples, reveals, elsewhere, TOLERANCE_PPM["fp32"])
    assert verdict == "pass", reason

    report = audit(run, commitment, lambda c, s: run.trainer.reveal(c.epoch, s))
    assert report.verdict == "pass" and len(report.steps) == 8 and max(report.distances_ppm()) <= 10
    assert report.to_json()["verdict"] == "pass"


def fabricate(run: Run, kind: str) -> tuple[WorkCommitment, WorkRecorder]:
    """A cheater's commitment for epoch 2 (real recorder, real sketches of fabricated gradients)."""
    epoch, m = 2, run.manifest
    _, start = run.trainer.start_state(epoch)
    _, stale_state = run.trainer.start_state(epoch - 1)
    recorder = WorkRecorder(m.run_id, run.peer, m.batch_size_per_step)
    worker, source = Recomputer(m), Recomputer(m)  # the cheater's model, and where its fabricated gradients come from
    worker.load(start)
    recorder.begin_epoch(epoch, worker.params)
    source.load(stale_state if kind == "stale" else start)
    generator = torch.Generator().manual_seed(1)
    steps = STEPS_PER_EPOCH * (2 if kind == "padded" else 1)
    for step in range(steps):
        if kind in ("random", "zeros"):
            grads = [torch.randn(p.shape, generator=generator) * 0.1 if kind == "random" else torch.zeros_like(p)
                     for p in worker.params]
        elif kind == "stale":
            grads = source.step_gradient(run.peer, epoch - 1, step)
        elif kind == "other-peer":
            grads = source.step_gradient(b"\x07" * 32, epoch, step)
        elif kind == "fewer-samples":
            x, y = batch_for(source.dataset, m.run_id, peer_id_bytes(run.peer), epoch, step, m.batch_size_per_step)
            source.model.zero_grad()
            source.loss_fn(source.model(x[:12]), y[:12]).backward()  # 12 of the 16 samples claimed
            grads = [p.grad for p in source.params]
        else:  # padded: the real steps, then as many again copied from step 0 (an inflated count)
            grads = source.step_gradient(run.peer, epoch, step if step < STEPS_PER_EPOCH else 0)
        for p, grad in zip(worker.params, grads):
            p.grad = grad
        recorder.record_step(epoch, step, worker.params)
    return recorder.end_epoch(epoch, completed=True), recorder


@pytest.mark.parametrize("kind", ["random", "zeros", "stale", "other-peer", "fewer-samples", "padded"])
def test_each_fabrication_fails(run, kind):
    commitment, recorder = fabricate(run, kind)
    report = audit(run, commitment, lambda c, s: recorder.reveal(c.epoch, s), spot=MAX_SPOT_STEPS)
    assert report.verdict == "fail", (kind, report.reason, report.distances_ppm())
    if kind == "padded":  # only the copied steps are off
        failing = [s for s, d in zip(report.steps, report.distances_ppm()) if d > TOLERANCE_PPM["fp32"]]
        assert failing and min(failing) >= STEPS_PER_EPOCH
    else:
        assert min(report.distances_ppm()) > 20 * TOLERANCE_PPM["fp32"]


def test_inflated_count_fails_without_recomputing(run):
    commitment = run.trainer.work_commitment(2)
    report = audit(run, commitment, lambda c, s: pytest.fail("no reveal needed"), samples=commitment.samples + 16)
    assert report.verdict == "fail" and "samples" in report.reason and report.reveals == ()


def test_a_claim_of_fewer_samples_than_committed_is_judged_by_its_steps(run):
    """Seen under load (credits e2e, 2026-12-02): a peer averaged 32 of the 384 samples it trained in an epoch (a round
    joined late); its claim for the 32 went out without a commitment and was withheld whenever drawn. It now names the
    commitment, and the audit recomputes the steps: honest work passes, and claiming less than committed gains
    nothing."""
    commitment = run.trainer.work_commitment(2)
    report = audit(run, commitment, lambda c, s: run.trainer.reveal(c.epoch, s), samples=commitment.batch_size)
    assert report.verdict == "pass", report.reason


def test_unanswered_false_or_stolen_work_gives_no_report_and_other_states_are_fetched(run):
    commitment = run.trainer.work_commitment(2)
    state = run.trainer.start_state(2)[1]
    args = (claim_for(run, commitment), commitment, subject_of(commitment), run.auditor, ALWAYS)
    assert audit_claim(Recomputer(run.manifest), state, *args, reveal=lambda c, s: None) is None
    # a claim carrying another peer's (honest) work digest: the commitment is not the claimant's
    thief = dataclasses.replace(claim_for(run, commitment), peer=run.auditor.public_key)
    assert audit_claim(Recomputer(run.manifest), state, thief, *args[1:],
                       reveal=lambda c, s: run.trainer.reveal(c.epoch, s)) is None

    def lying(c, steps):  # another epoch's (honest) sketches presented as this epoch's
        return [StepReveal(r.step, r.sketch, r.proof) for r in run.trainer.reveal(1, steps)]
    assert audit_claim(Recomputer(run.manifest), state, *args, reveal=lying) is None
    def reveal(c, steps):
        return run.trainer.reveal(c.epoch, steps)

    other = audit_claim(Recomputer(run.manifest), run.trainer.start_state(1)[1], *args, reveal=reveal,
                        state_of=lambda c: run.trainer.start_state(1)[1])  # not the committed state either
    assert other.verdict == "inconclusive" and other.reveals == ()
    other.check(claim_for(run, commitment))
    # an auditor on other parameters recomputes at the claimant's own state, checked by its digest
    served = audit_claim(Recomputer(run.manifest), run.trainer.start_state(1)[1], *args, reveal=reveal,
                         state_of=lambda c: run.trainer.start_state(c.epoch)[1])
    assert served.verdict == "pass"
    served.check(claim_for(run, commitment))


def test_selection_is_verifiable_unpredictable_and_at_the_rate():
    auditor, other = crypto.SigningKey(bytes(32)), crypto.SigningKey(bytes([1]) * 32)
    subjects = [crypto.digest(i.to_bytes(4, "big")) for i in range(3000)]
    tickets = [audit_ticket(auditor, s, 7) for s in subjects]
    assert tickets == [audit_ticket(auditor, s, 7) for s in subjects]  # one ticket per claim and auditor
    selected = sum(is_selected(t, 100_000) for t in tickets)
    assert 240 <= selected <= 360  # 10% of 3000, within ~4 standard deviations
    assert all(is_selected(t, ALWAYS) for t in tickets) and not any(is_selected(t, 0) for t in tickets)
    verify_ticket(auditor.public_key, subjects[0], 7, tickets[0])
    with pytest.raises(InvalidSignature):
        verify_ticket(other.public_key, subjects[0], 7, tickets[0])
    with pytest.raises(InvalidSignature):
        verify_ticket(auditor.public_key, subjects[0], 8, tickets[0])
    steps = spot_steps(tickets[0], 1000, 8)
    assert len(set(steps)) == 8 and list(steps) == sorted(steps) and all(0 <= s < 1000 for s in steps)
    assert spot_steps(tickets[0], 5, 8) == (0, 1, 2, 3, 4)
    assert spot_steps(tickets[1], 1000, 8) != steps


def test_tampered_reports_are_named(run):
    commitment, recorder = fabricate(run, "random")
    report = audit(run, commitment, lambda c, s: recorder.reveal(c.epoch, s))
    honest = run.trainer.work_commitment(2)
    flipped = dataclasses.replace(report, verdict="pass")
    first = dataclasses.replace(report.reveals[0], sketch=report.recomputed[0])
    altered = dataclasses.replace(report, reveals=(first,) + report.reveals[1:])
    strict = dataclasses.replace(report, tolerance_ppm=0)
    unselected = dataclasses.replace(report, rate_ppm=0)
    cases = {flipped: "the sketches say", altered: "not the one committed", strict: "below the fp32 rule",
             unselected: "does not select"}
    claim = claim_for(run, commitment)
    for tampered, reason in cases.items():
        with pytest.raises(InvalidMessage, match=reason):
            tampered.check(claim)
    with pytest.raises(InvalidMessage, match="work_digest"):
        report.check(claim_for(run, honest))
    with pytest.raises(InvalidMessage, match="samples"):
        report.check(claim_for(run, commitment, samples=commitment.samples + 1))
    # an auditor that reports different recomputed sketches is caught by anyone recomputing
    framed = dataclasses.replace(report, recomputed=tuple(r.sketch for r in report.reveals), verdict="pass")
    with pytest.raises(InvalidMessage, match="does not match"):
        recheck_report(Recomputer(run.manifest), run.trainer.start_state(2)[1], framed, claim)


@pytest.mark.parametrize("data", [b"", b"\x90", bytes(300), b"\x9c" + b"\xc0" * 12])
def test_records_decode_strictly(data):
    for record in (WorkCommitment, StepReveal, AuditReport):
        with pytest.raises(InvalidMessage):
            record.from_wire(data)


def test_state_digest_names_values_and_layout():
    a = [torch.ones(2, 3), torch.zeros(4)]
    assert state_digest(a) == state_digest([t.clone() for t in a])
    assert state_digest(a) != state_digest([torch.ones(3, 2), torch.zeros(4)])
    assert state_digest(a) != state_digest([torch.ones(2, 3), torch.tensor([0.0, 0.0, 0.0, 1e-30])])


def test_recorder_commits_only_to_whole_recomputable_epochs():
    params = [torch.nn.Parameter(torch.zeros(3, 5)), torch.nn.Parameter(torch.zeros(5))]
    recorder = WorkRecorder(bytes(32), bytes(32), 4)

    def epoch(number: int, grads) -> WorkCommitment | None:
        recorder.begin_epoch(number, params)
        for step, grad in grads:
            params[0].grad, params[1].grad = torch.full((3, 5), grad), torch.full((5,), grad)
            recorder.record_step(number, step, params)
        return recorder.end_epoch(number, completed=True)

    whole = epoch(0, [(0, 1.0), (1, 2.0)])
    assert whole.steps == 2 and whole.samples == 8 and recorder.commitment(0) == whole
    assert epoch(1, [(0, 1.0), (2, 2.0)]) is None  # a step missing
    assert epoch(2, [(0, 1.0), (1, float("inf"))]) is None  # an fp16 overflow: the scaler skipped that step
    recorder.begin_epoch(4, params)
    params[0].grad = params[1].grad = None
    recorder.record_step(4, 0, params)
    with torch.no_grad():
        params[1].add_(1.0)  # a state download landing mid-epoch
    recorder.record_step(4, 1, params)
    assert recorder.end_epoch(4, completed=True) is None
    recorder.begin_epoch(3, params)
    assert recorder.end_epoch(3, completed=False) is None
    assert [r.step for r in recorder.reveal(0, [1])] == [1] and recorder.reveal(1, [0]) is None
    with pytest.raises(InvalidMessage):
        recorder.reveal(0, [2])


def test_start_states_are_capped_by_count_and_bytes():
    states = StartStates(keep=3, max_bytes=1000)
    small = [torch.zeros(10)]  # 40 bytes
    for epoch in range(5):
        states.put(epoch, [t + epoch for t in small])
    assert states.epochs() == [2, 3, 4] and torch.equal(states.get(4)[1][0], torch.full((10,), 4.0))
    assert states.get(4)[0] == state_digest([torch.full((10,), 4.0)]) and states.get(1) is None
    big = [torch.zeros(100)]  # 400 bytes: two fit in 1000
    states.put(5, big)
    states.put(6, big)
    assert states.epochs() == [5, 6]
    states.put(7, [torch.zeros(300)])  # 1200 bytes: none fits, none is kept
    assert states.epochs() == []


def test_epochs_with_open_claims_keep_their_records_until_settled():
    """NAT test, 2026-12-02: an epoch-1 claim waited for its witness and was handed in (and audited) at epoch 9; its
    records, kept for the last KEEP_EPOCHS epochs only, were gone, the audit was never answered and the honest epoch
    never paid. A pinned epoch (an open claim) keeps its records and start state until unpinned; the byte cap holds."""
    params = [torch.nn.Parameter(torch.zeros(4))]
    recorder = WorkRecorder(bytes(32), bytes(32), 2, keep_epochs=2, start_states=StartStates(keep=2, max_bytes=10**6))

    def epoch(number: int) -> WorkCommitment:
        with torch.no_grad():
            params[0].add_(1.0)
        recorder.begin_epoch(number, params)
        params[0].grad = torch.ones(4)
        recorder.record_step(number, 0, params)
        return recorder.end_epoch(number, completed=True)

    first = epoch(0)
    recorder.pin(0)
    for number in range(1, 6):
        epoch(number)
    assert recorder.commitment(0) == first and recorder.reveal(0, [0])[0].step == 0
    assert recorder.start_states.get(0)[0] == first.state_digest
    assert recorder.commitment(3) is None and recorder.commitment(5) is not None  # the rest: the last two, as before
    assert sorted(recorder.start_states.epochs()) == [0, 4, 5]
    recorder.unpin(0)
    epoch(6)
    assert recorder.commitment(0) is None and recorder.start_states.get(0) is None
    states = StartStates(keep=1, max_bytes=100)  # pinned or not, the bytes cap wins (two 40-byte states fit)
    for number in range(4):
        states.pin(number)
        states.put(number, [torch.zeros(10)])
    assert states.epochs() == [2, 3]


SEGMENT = 4


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A lone peer's real training run in local (DiLoCo) mode: Adam inner steps, outer step with lr 1 and no momentum
    (the new phi is the trained theta), segments of SEGMENT steps."""
    root = tmp_path_factory.mktemp("audit-local")
    manifest = Manifest.from_toml(mlp_synthetic_spec(
        "audit-local-test", batch_size_per_step=16, target_batch_size=16 * STEPS_PER_EPOCH, in_features=6,
        hidden=[16], out_features=2, seed=5, optimizer="adam", lr="0.01", max_epochs=EPOCHS, mode="local",
        averaging={"outer_lr": "1", "outer_momentum": "0"}))
    yield finished_run(root, manifest, TrainerOptions(device="cpu", work_history=8, work_local=True, work_segment=SEGMENT))


def local_audit(run: Run, commitment: WorkCommitment, reveal, segment_state) -> AuditReport:
    claim = claim_for(run, commitment)
    report = audit_claim(Recomputer(run.manifest), None, claim, commitment, subject_of(commitment), run.auditor,
                         ALWAYS, reveal, segment_state=segment_state, spot=MAX_SPOT_STEPS)
    report = AuditReport.from_wire(report.to_wire())
    report.check(claim)
    recheck_report(Recomputer(run.manifest), None, report, claim,
                   segment_state=lambda leaf: segment_state(commitment, leaf))
    return report


def test_local_mode_segments_replay_to_the_next_epoch_and_pass(local_run):
    run, epoch = local_run, 1
    commitment = run.trainer.work_commitment(epoch)
    # (a lone local-mode peer may take a step or two past the target before its tracker ends the epoch)
    assert commitment.segment == SEGMENT and commitment.steps >= STEPS_PER_EPOCH
    assert commitment.leaves == -(-commitment.steps // SEGMENT) >= 3
    assert commitment.samples == run.trainer.contributions()[epoch]
    # the segments, replayed one after another from the first one's state, end where the next epoch starts
    recomputer = Recomputer(run.manifest)
    state = run.trainer.segment_state(epoch, 0)
    assert state_digest(state.params) == commitment.state_digest == run.trainer.start_state(epoch)[0]
    for leaf in range(commitment.leaves):
        end = recomputer.replay(run.peer, epoch, commitment.leaf_steps(leaf), state)
        if leaf + 1 < commitment.leaves:
            state = run.trainer.segment_state(epoch, leaf + 1)
            for got, want in zip(end, state.params):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for got, want in zip(end, run.trainer.start_state(epoch + 1)[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    report = local_audit(run, commitment, lambda c, leaves: run.trainer.reveal(c.epoch, leaves),
                         lambda c, leaf: run.trainer.segment_state(c.epoch, leaf))
    assert report.verdict == "pass" and report.steps == tuple(range(commitment.leaves)), report.reason


def test_local_mode_fabricated_segments_fail(local_run):
    """A cheater that moves its parameters at random (no gradient computed) and commits to that trajectory."""
    run, epoch, m = local_run, 1, local_run.manifest
    worker = Recomputer(m)
    start = run.trainer.segment_state(epoch, 0)
    worker.load(start.params)
    optimizer = optimizer_factory(m.optimizer.name, m.optimizer.as_dict(), with_state=True)(worker.params)
    optimizer.load_state_dict({"state": start.optimizer, "param_groups": optimizer.state_dict()["param_groups"]})
    recorder = LocalWorkRecorder(m.run_id, run.peer, m.batch_size_per_step, segment=SEGMENT)
    recorder.begin_epoch(epoch, worker.params, optimizer)
    generator = torch.Generator().manual_seed(2)
    for step in range(STEPS_PER_EPOCH):
        with torch.no_grad():
            for p in worker.params:
                p.add_(torch.randn(p.shape, generator=generator) * 0.01)
        recorder.after_step(worker.params, optimizer, last=step == STEPS_PER_EPOCH - 1)
    commitment = recorder.end_epoch(epoch, completed=True)
    report = local_audit(run, commitment, lambda c, leaves: recorder.reveal(c.epoch, leaves),
                         lambda c, leaf: recorder.segment_state(c.epoch, leaf))
    assert report.verdict == "fail" and min(report.distances_ppm()) > 20 * TOLERANCE_PPM["fp32"], report.reason
