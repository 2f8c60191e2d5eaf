"""The ``k2eg`` command: ``k2eg -e ENV -a APP get|put|monitor|snapshot|info ...``, a shell, and ``k2eg stack``.

The client is created on first use, so ``k2eg stack`` and ``--help`` work
without an environment, and a malformed PV URI fails before Kafka is touched.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click

from k2eg import __version__
from k2eg.client.errors import OperationError, OperationTimeout

from . import archive as archive_commands
from . import commands
from .repl import run_repl

ENV_VAR_ENVIRONMENT = "K2EG_CLI_DEFAULT_ENVIRONMENT"
ENV_VAR_APP_NAME = "K2EG_CLI_DEFAULT_APP_NAME"

_LEVELS = {"CRITICAL": logging.CRITICAL, "FATAL": logging.CRITICAL, "ERROR": logging.ERROR,
           "WARNING": logging.WARNING, "WARN": logging.WARNING, "INFO": logging.INFO,
           "DEBUG": logging.DEBUG, "NOTSET": logging.NOTSET}


class CliError(click.ClickException):
    """A user-facing failure: the message alone on stderr (no "Error:" prefix), with its own exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(click.style(self.format_message(), fg="red"), err=True, file=file)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map what the client raises for user mistakes and remote failures to messages and exit codes."""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except OperationError as e:
        msg = e.args[0] if e.args and e.args[0] else "(no message)"
        raise CliError(f"Remote error {e.error}: {msg}", 1) from None
    except (OperationTimeout, TimeoutError) as e:
        text = str(e) or "no reply in time"
        raise CliError(text if text.lower().startswith("timeout") else f"Timeout: {text}", 2) from None
    except ValueError as e:
        raise CliError(str(e), 2) from None
    except Exception as e:
        # Kafka unreachable, bad SASL settings...: the client library's message says it all.
        if type(e).__name__ == "KafkaException":
            raise CliError(f"Kafka error: {e}", 1) from None
        raise


class CliState:
    """Shared by every command of one invocation (or one shell session); owns the client."""

    def __init__(self, environment: str | None = None, app_name: str | None = None,
                 client_factory: Callable[[str, str], Any] | None = None):
        self.environment = environment
        self.app_name = app_name
        self.in_repl = False
        self._factory = client_factory
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            if not self.environment:
                raise click.UsageError(f"Missing option '-e' / '--environment' (or set {ENV_VAR_ENVIRONMENT}).")
            if not self.app_name:
                raise click.UsageError(f"Missing option '-a' / '--app-name' (or set {ENV_VAR_APP_NAME}).")
            factory = self._factory
            if factory is None:
                from k2eg.dml import dml as factory
            logging.getLogger("k2eg.cli").debug("connecting: environment %s, app %s", self.environment, self.app_name)
            try:
                self._client = factory(self.environment, self.app_name)
            except (ValueError, click.ClickException):
                raise  # a bad environment or app name: exit 2 with the library's message
            except Exception as e:
                # Startup waits for the reply topic; failing there means Kafka is unreachable.
                raise CliError(f"cannot connect to Kafka {self._broker()}for environment '{self.environment}': "
                               f"{str(e) or ('no answer' if isinstance(e, TimeoutError) else type(e).__name__)}",
                               1) from None
        return self._client

    def _broker(self) -> str:
        try:
            from k2eg.client.environment import load
            return f"at {load(self.environment).kafka_broker_url} "
        except Exception:
            return ""

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


class LogLevel(click.ParamType):
    """A level name (any case) or number, like 0.3.0's click-loglevel option."""

    name = "level"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            return int(text)
        level = _LEVELS.get(text.upper())
        if level is None:
            self.fail(f"{value!r} is not a log level ({', '.join(n for n in _LEVELS if n not in ('FATAL', 'WARN'))})",
                      param, ctx)
        return level


class StackCommand(click.Command):
    """``k2eg stack``: the local-stack group of ``k2eg.stack.__main__``, imported only when used.

    It runs as its own root context: it needs no ``-e``/``-a``, and its
    options resolve against itself as they do under ``k2eg-stack``.
    """

    def __init__(self) -> None:
        super().__init__("stack", add_help_option=False, context_settings={"ignore_unknown_options": True},
                         short_help="Run the local stack (Kafka, demo IOC, gateway): k2eg stack --help.",
                         help="Run the local stack (Kafka, demo IOC, gateway); same as k2eg-stack.")

    @staticmethod
    def load() -> click.Command:
        try:
            import k2eg.stack.__main__ as mod
        except Exception as e:  # not installed yet, or an optional EPICS dependency is missing
            raise CliError(f"the local stack command is not available: {type(e).__name__}: {e} "
                           "(install the gateway extra: pip install 'k2eg[gateway]')", 1) from None
        for attr in ("cli", "main"):
            cmd = getattr(mod, attr, None)
            if isinstance(cmd, click.Command):
                return cmd
        raise CliError("the local stack command is not available: k2eg.stack.__main__ has no click command", 1)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        prog = f"{parent.command_path} {info_name}" if parent is not None else (info_name or "stack")
        return self.load().make_context(prog, list(args), **extra)


class K2egGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        with translate_errors():
            return super().invoke(ctx)


@click.group(cls=K2egGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="k2eg")
@click.option("-e", "--environment", envvar=ENV_VAR_ENVIRONMENT, metavar="ENV",
              help=f"client environment: ENV.ini in $K2EG_PYTHON_CONFIGURATION_PATH_FOLDER [${ENV_VAR_ENVIRONMENT}]")
@click.option("-a", "--app-name", envvar=ENV_VAR_APP_NAME, metavar="APP",
              help=f"application name; names this client's reply topic [${ENV_VAR_APP_NAME}]")
@click.option("-l", "--log-level", type=LogLevel(), default="WARNING", show_default=True,
              help="logging level on stderr (DEBUG, INFO, WARNING, ERROR or a number)")
@click.pass_context
def cli(ctx: click.Context, environment: str | None, app_name: str | None, log_level: int) -> None:
    """Read, write, monitor and snapshot EPICS PVs through k2eg (Kafka).

    PVs are URIs: pva://NAME or ca://NAME. Without a command, starts an
    interactive shell in which the same commands are typed without "k2eg".
    """
    state = ctx.obj if isinstance(ctx.obj, CliState) else None
    if state is None:
        state = ctx.obj = CliState()
    state.environment = state.environment or environment
    state.app_name = state.app_name or app_name
    if ctx.parent is None:
        root_logger = logging.getLogger()
        previous = root_logger.level
        logging.basicConfig(format="[%(levelname)-8s] %(name)s: %(message)s", level=log_level, stream=sys.stderr)
        root_logger.setLevel(log_level)
        # Restored so an embedding process (or a test session) keeps its own level.
        ctx.call_on_close(lambda: root_logger.setLevel(previous))
        ctx.call_on_close(state.close)
    if ctx.invoked_subcommand is None and not state.in_repl:
        code = run_repl(ctx)
        if code and not sys.stdin.isatty():
            ctx.exit(code)  # a piped script fails like sh does: with its last command's status


def _shell(ctx: click.Context) -> None:
    root = ctx.find_root()
    if root.obj.in_repl:
        click.echo("already in the k2eg shell", err=True)
        return
    run_repl(root)


cli.add_command(click.Command("shell", callback=click.pass_context(_shell),
                              help='Start the interactive shell (also what "k2eg" alone does).'))
# 0.3.0 (click-repl) called it "repl".
cli.add_command(click.Command("repl", callback=click.pass_context(_shell), hidden=True,
                              help="Same as shell."))
for _cmd in commands.ALL:
    cli.add_command(_cmd)
for _cmd in archive_commands.ALL:
    cli.add_command(_cmd)
cli.add_command(StackCommand())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="k2eg")


if __name__ == "__main__":
    main()
