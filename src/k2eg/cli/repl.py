"""The interactive ``k2eg`` shell: one client, many commands.

A small loop over ``input()`` (readline when there is a terminal) that hands
each shlex-split line to the same click commands, instead of depending on
click-repl/prompt_toolkit. Fed from a pipe it runs a script quietly.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click

PROMPT = "k2eg> "
HISTORY = Path(os.environ.get("K2EG_CLI_HISTORY", "~/.k2eg_history")).expanduser()
_BUILTINS = ("help", "exit", "quit")


def run_repl(ctx: click.Context) -> int:
    """Read commands until exit/quit/EOF; returns the exit code of the last command."""
    state = ctx.obj
    state.in_repl = True
    interactive = sys.stdin.isatty()
    readline = _setup_readline(ctx) if interactive else None
    code = 0
    if interactive:
        click.echo("k2eg shell: type 'help' for the commands, 'exit' or Ctrl-D to leave.", err=True)
    try:
        while True:
            try:
                line = input(PROMPT if interactive else "")
            except EOFError:
                if interactive:
                    click.echo(err=True)
                break
            except KeyboardInterrupt:
                click.echo(err=True)
                continue
            try:
                args = shlex.split(line, comments=True)
            except ValueError as e:
                click.echo(f"cannot parse the line: {e}", err=True)
                code = 2
                continue
            if not args:
                continue
            if args[0] in ("exit", "quit"):
                break
            if args[0] in ("help", "?"):
                if len(args) == 1:
                    click.echo(ctx.get_help())
                    code = 0
                    continue
                args = [*args[1:], "--help"]
            code = run_line(ctx, args)
    finally:
        state.in_repl = False
        if readline is not None:
            try:
                readline.write_history_file(str(HISTORY))
            except OSError:
                pass
    return code


def run_line(ctx: click.Context, args: list[str]) -> int:
    """Run one command as a child of the shell's context; errors are shown, never fatal."""
    from .main import translate_errors

    group = ctx.command
    try:
        with translate_errors():
            name, cmd, rest = group.resolve_command(ctx, args)  # type: ignore[attr-defined]
            with cmd.make_context(name, rest, parent=ctx) as sub:
                sub.command.invoke(sub)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (click.Abort, KeyboardInterrupt, EOFError):
        click.echo("interrupted", err=True)
        return 130


def _setup_readline(ctx: click.Context) -> Any:
    """Line editing, history and command-name completion, when the platform has readline."""
    try:
        import readline
    except ImportError:
        return None
    try:
        readline.read_history_file(str(HISTORY))
    except OSError:
        pass
    readline.set_history_length(1000)
    names = sorted([*ctx.command.list_commands(ctx), *_BUILTINS])  # type: ignore[attr-defined]

    def complete(text: str, n: int) -> str | None:
        if readline.get_begidx() > 0:
            return None  # only command names; PV names are not known locally
        matches = [c + " " for c in names if c.startswith(text)]
        return matches[n] if n < len(matches) else None

    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")
    return readline
