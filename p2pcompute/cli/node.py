"""`p2pc node ...`, `p2pc peers` and `p2pc bootstrap`: run a node or bootstrap peer, inspect it, list the swarm."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import click

from p2pcompute.cli.common import console, data_dir_option, emit, json_option, print_fields, print_table
from p2pcompute.cli.settings import SETTINGS_EPILOG, config_option, setting_option, setting_options
from p2pcompute.config import SETTINGS, load_config, resolve_data_dir
from p2pcompute.errors import KeyFileError, UsageError
from p2pcompute.identity import Identity, check_key_permissions
from p2pcompute.node.control import ControlClient, write_private

NODE_SETTINGS = tuple(SETTINGS)  # `p2pc node start` takes a flag for every setting
# a bootstrap peer trains nothing
BOOTSTRAP_SETTINGS = tuple(name for name, declared in SETTINGS.items() if declared.section != "training")

ready_file_option = click.option(
    "--ready-file", type=click.Path(dir_okay=False), default=None,
    help="Write the multiaddrs here once the node is up (for scripts and tests).",
)


def _start(role: str, data_dir, config_file, overrides: dict, ready_file, as_json: bool) -> None:
    from p2pcompute import logs
    from p2pcompute.node.daemon import Node, run_foreground

    config = load_config(data_dir, config_file, overrides)
    logs.set_level(logging.INFO)  # a running node says what it does: one line per event

    def on_ready(node: Node) -> None:
        if ready_file:
            write_private(Path(ready_file), ("\n".join(node.maddrs) + "\n").encode())
        if as_json:
            click.echo(__import__("json").dumps(node.status_report()), nl=True)
        else:
            what = "bootstrap peer" if role == "bootstrap" else "node"
            console.print(f"[bold green]{what} up[/] peer id [bold]{node.identity.peer_id_b58}[/]")
            console.print("multiaddrs (hand these out as --bootstrap):" if role == "bootstrap" else "multiaddrs:")
            for addr in node.maddrs:
                console.print(f"  {addr}", highlight=False, soft_wrap=True)
            console.print(f"control API on 127.0.0.1:{node.control.port}; stop with Ctrl-C", highlight=False)
        sys.stdout.flush()

    run_foreground(Node(config, role=role), on_ready)


@click.group()
def node() -> None:
    """Run and inspect a volunteer node."""


def _start_command(role: str, settings_names, doc: str):
    """The body and options of `p2pc node start` and `p2pc bootstrap`: the same but for the role and settings."""

    @data_dir_option
    @config_option
    @setting_options(settings_names)
    @ready_file_option
    @click.option("--json", "as_json", is_flag=True, help="Print the startup report as JSON.")
    def command(data_dir, config_file, ready_file, as_json, **settings) -> None:
        _start(role, data_dir, config_file, settings, ready_file, as_json)

    command.__doc__ = doc
    return command


node_start = node.command("start", epilog=SETTINGS_EPILOG)(
    _start_command("node", NODE_SETTINGS, "Run a node in the foreground until Ctrl-C / SIGTERM."))


@node.command("status")
@data_dir_option
@json_option
def node_status(data_dir, as_json) -> None:
    """Show what the running node is doing."""
    report = ControlClient(resolve_data_dir(data_dir)).call("status")

    def render(r: dict) -> None:
        rows = [
            ("peer id", r["peer_id"]),
            ("role", r["role"]),
            ("status", r["status"] + (" (paused by the owner: p2pc node resume)" if r.get("paused") else "")),
            ("uptime", f"{r['uptime_s']:.0f} s"),
            ("reachability", _reachability_row(r.get("reachability"))),
            ("peers known", r["peers_known"]),
            ("current run", r["current_run"] or "-"),
            *(_training_rows(r.get("training"))),
            ("credits", "-" if r.get("credits") is None else f"{r['credits'] / 1_000_000:.6f}"),
            ("ledger entries", r.get("ledger_entries", "-")),
            ("device", f"{r['device']} {r['device_name']}".strip()),
            ("multiaddrs", "\n".join(r["multiaddrs"])),
        ]
        print_fields("node status", rows)

    emit(report, as_json, render)


def _reachability_row(reachability: dict | None) -> str:
    if not reachability:
        return "-"
    return f"{reachability['state']}: {reachability['reason']}"


def _training_rows(training: dict | None) -> list[tuple[str, str]]:
    if not training:
        return []
    rows = [("training", training["reason"])]
    trainer = training.get("trainer")
    if trainer:
        loss = "-" if trainer["loss"] is None else f"{trainer['loss']:.4f}"
        rows.append(("run progress", f"{training['run']['name']}: {trainer['status']}, epoch {trainer['epoch']} "
                                     f"(swarm {trainer['global_epoch']}), loss {loss}, "
                                     f"{trainer['samples_per_second']:.1f} samples/s, {trainer['peers']} peers"))
        rows.append(("averaging", f"{trainer.get('mode', '?')} mode, {100 * trainer.get('sync_share', 0.0):.1f}% "
                                  "of training time in the swarm optimizer's step (rounds, update)"))
        if trainer.get("data_wait_share"):
            rows.append(("data", f"{100 * trainer['data_wait_share']:.1f}% of training time waiting for shards"))
        if trainer.get("reason"):
            rows.append(("waiting because", trainer["reason"]))
    rounds = training.get("last_rounds") or []
    if rounds:
        rows.append(("last rounds", "; ".join(
            f"{r['kind']} {'ok' if r['ok'] else 'failed'}" + (f" x{r['group_size']}" if r["ok"] else f" ({r['error']})")
            for r in rounds)))
    if training.get("idle"):
        rows.append(("idle policy", ("train: " if training["idle"]["train"] else "pause: ") + training["idle"]["reason"]))
    return rows


@node.command("stop")
@data_dir_option
def node_stop(data_dir) -> None:
    """Ask the running node to shut down cleanly."""
    ControlClient(resolve_data_dir(data_dir)).call("shutdown", {})
    console.print("stopping")


@node.command("pause")
@data_dir_option
@json_option
def node_pause(data_dir, as_json) -> None:
    """Pause training: the node leaves its averaging group after the current step (until `p2pc node resume`)."""
    _hold(data_dir, as_json, "pause")


@node.command("resume")
@data_dir_option
@json_option
def node_resume(data_dir, as_json) -> None:
    """Resume training after `p2pc node pause` (the idle policy and schedule still apply)."""
    _hold(data_dir, as_json, "resume")


def _hold(data_dir, as_json, what: str) -> None:
    """POST pause or resume; prints the supervisor's state after it."""
    report = ControlClient(resolve_data_dir(data_dir)).call(what, {})
    emit(report, as_json, lambda r: console.print(f"{what}d: {r['pause_reason'] or r['reason']}", highlight=False))


@node.command("dashboard")
@data_dir_option
@click.option("--no-browser", is_flag=True, help="Only print the link, even where a browser could be opened.")
@json_option
def node_dashboard(data_dir, no_browser, as_json) -> None:
    """Print a one-time login link to the node's web page, and open it in a browser if there is one."""
    link = ControlClient(resolve_data_dir(data_dir)).call("auth/login-code", {})
    opened = not (no_browser or as_json) and _open_browser(link["url"])

    def render(r: dict) -> None:
        console.print(f"the node's page (the link logs you in once, within {r['expires_in_s']:.0f} s):")
        click.echo(r["url"])
        if r["opened"]:
            console.print("opened in your browser")

    emit(dict(link, opened=opened), as_json, render)


def _open_browser(url: str) -> bool:
    """Open `url` in a graphical browser if this session has a display; never fails (a text browser would take
    over the terminal, so none is started without a display)."""
    import webbrowser

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        return bool(webbrowser.open(url, new=2))
    except (webbrowser.Error, OSError):
        return False


@node.command("id")
@data_dir_option
@json_option
def node_id(data_dir, as_json) -> None:
    """Print this node's PeerID (creating its key on first use)."""
    config = load_config(data_dir)
    identity = Identity.load_or_create(config.key_path)
    report = {"peer_id": identity.peer_id_b58, "public_key": identity.public_key.hex()}
    emit(report, as_json, lambda r: click.echo(r["peer_id"]))


@node.command("export-key")
@data_dir_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="File to write (mode 0600).")
def export_key(data_dir, output) -> None:
    """Copy the node's identity key to a file, to move the node to another machine."""
    config = load_config(data_dir)
    identity = Identity.load(config.key_path)
    out = Path(output)
    if out.exists():
        raise UsageError(f"{out} exists; refusing to overwrite a file")
    identity.write(out)
    console.print(f"wrote the key of {identity.peer_id_b58} to {out} (keep it secret)")


@node.command("import-key")
@data_dir_option
@click.argument("key_file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing key (its identity and credits are lost here).")
def import_key(data_dir, key_file, force) -> None:
    """Install an exported identity key as this node's key."""
    config = load_config(data_dir)
    src = Path(key_file)
    check_key_permissions(src)
    identity = Identity.load(src)
    if config.key_path.exists() and not force:
        current = Identity.load(config.key_path)
        if current.public_key != identity.public_key:
            raise KeyFileError(f"{config.key_path} already holds {current.peer_id_b58}; pass --force to replace it")
    identity.write(config.key_path)
    console.print(f"this node is now {identity.peer_id_b58}")


bootstrap = click.command("bootstrap", epilog=SETTINGS_EPILOG)(_start_command(
    "bootstrap", BOOTSTRAP_SETTINGS,
    "Run a DHT-only bootstrap peer with a persistent identity; prints the multiaddrs to hand out."))


@click.command()
@data_dir_option
@setting_option("bootstrap")
@json_option
def peers(data_dir, bootstrap, as_json) -> None:
    """List live peers from the DHT (through the running node, or with --bootstrap as a one-shot client)."""
    if bootstrap:
        records = [dict(r.to_json(), self=False) for r in _query_peers_directly(bootstrap)]
    else:
        records = ControlClient(resolve_data_dir(data_dir)).call("peers")

    def render(rows: list[dict]) -> None:
        now = time.time() * 1000
        print_table(
            f"{len(rows)} live peers",
            ["peer id", "name", "status", "reachability", "device", "run", "seen"],
            [
                (
                    r["peer_id"] + (" (this node)" if r.get("self") else ""),
                    r["name"],
                    r["status"],
                    r.get("reachability", "unknown"),
                    f"{r['device']} {r['device_name']}".strip(),
                    (r["run_id"] or "-")[:12],
                    f"{max(0.0, (now - r['updated_at_ms']) / 1000):.0f} s ago",
                )
                for r in rows
            ],
        )

    emit(records, as_json, render)


def _query_peers_directly(bootstrap: tuple[str, ...]):
    """Join the DHT as a throwaway client with an ephemeral key, read the peer records, leave."""
    from p2pcompute.config import load_config as _load
    from p2pcompute.swarm.dht import fetch_peer_records, start_dht

    with tempfile.TemporaryDirectory(prefix="p2pc-client-") as tmp:
        config = _load(tmp, overrides={"bootstrap": bootstrap})
        identity = Identity.generate()
        identity.write(Path(tmp) / "identity.key")
        dht = start_dht(identity, listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=config.bootstrap,
                        startup_timeout=config.startup_timeout, client_mode=True)
        try:
            return [r for r in fetch_peer_records(dht) if r.status != "stopped"]
        finally:
            dht.shutdown()
