"""The command-line flags of the node settings, spelled from their one declaration (p2pcompute.config.NodeConfig)."""

from __future__ import annotations

from typing import Callable, Iterable

import click

from p2pcompute.config import SETTINGS

config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), default=None,
    help="TOML config file (default: <data-dir>/config.toml if present).",
)

SETTINGS_EPILOG = ("Every setting can also be given in config.toml ([section] key) or as $P2PC_<KEY> "
                   "(e.g. $P2PC_RECORD_TTL); flags win over the environment, which wins over the file.")


def setting_option(name: str) -> Callable:
    """The flag of one setting: an on/off pair, a repeatable flag for lists, else one value. Values reach
    load_config as given (None when absent), so the setting's own check runs and its error names the flag."""
    declared = SETTINGS[name]
    text = declared.help[0].upper() + declared.help[1:]
    if declared.check.metavar is None:
        off_flag = declared.off_flag or "--no-" + declared.flag.removeprefix("--")
        shown = {True: declared.flag, False: off_flag}.get(declared.default, f"neither: {declared.default}")
        return click.option(f"{declared.flag}/{off_flag}", name, default=None, help=f"{text} [default: {shown}]")
    notes = []
    if declared.check.multiple:
        notes.append("repeatable")
    shown = " ".join(declared.default) if declared.check.multiple else str(declared.default)
    if shown:
        notes.append(f"default: {shown}")
    return click.option(declared.flag, name, default=None, multiple=declared.check.multiple,
                        metavar=declared.check.metavar, help=text + (f" [{'; '.join(notes)}]" if notes else ""))


def setting_options(names: Iterable[str]) -> Callable:
    """The flags of several settings, shown in --help in the order given."""
    options = [setting_option(name) for name in names]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate
