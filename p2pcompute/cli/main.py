"""Entry point of `p2pc`: the top-level group, error handling and exit codes."""

from __future__ import annotations

import logging
import sys

import click

from p2pcompute import __version__
from p2pcompute.cli.common import err_console
from p2pcompute.errors import P2PCError


class _Group(click.Group):
    """Turns every expected error into one line on stderr and its exit code; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except P2PCError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2pc")
@click.option("--debug", is_flag=True, envvar="P2PC_DEBUG", help="Show tracebacks and verbose logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """p2pcompute: lend an idle GPU to collaborative training runs and earn signed credits.

    \b
    Volunteers:   p2pc node start / status / id
    Researchers:  p2pc run publish / list / status / checkpoint; p2pc data publish / list / show
    Anyone:       p2pc ledger balance / history / top / verify ...
    Swarm:        p2pc peers, p2pc bootstrap, p2pc demo
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _configure_logging(debug)


def _configure_logging(debug: bool) -> None:
    from p2pcompute import logs

    logs.configure(logging.WARNING, debug)  # a running node raises its own level to INFO (cli/node.py)


def _register() -> None:
    """Attach every command group found; each lives in its own module under p2pcompute/cli/."""
    import importlib

    for module_name, attr in (
        ("p2pcompute.cli.node", "node"),
        ("p2pcompute.cli.node", "peers"),
        ("p2pcompute.cli.node", "bootstrap"),
        ("p2pcompute.cli.run", "run"),
        ("p2pcompute.cli.data", "data"),
        ("p2pcompute.cli.ledger", "ledger"),
        ("p2pcompute.cli.demo", "demo"),
    ):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        cli.add_command(getattr(module, attr))


_register()


def main() -> None:
    cli(prog_name="p2pc")


if __name__ == "__main__":
    main()
