"""``k2eg-stack``: run Kafka, the demo IOC and the gateway locally with one command.

``run`` (the default) stays in the foreground until Ctrl-C; ``start`` does the
same in the background and returns once everything answers; ``stop`` and
``env`` find that background stack through ``<state-dir>/stack.json``.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import click

from .kafka import StackError, _tail
from .runner import (Stack, kill_leftovers, read_state, remove_state, runner_alive, state_path, wait_gone,
                     write_state)

DEFAULT_STATE_DIR = Path("var/stack")


class _Terminated(Exception):
    """SIGTERM/SIGHUP turned into an exception, so it unwinds a start in progress like Ctrl-C does."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signal.Signals(signum).name)


def _state_dir(ctx: click.Context, value: Path | None) -> Path:
    """A subcommand's ``--state-dir`` wins over the group's, which wins over ``./var/stack``."""
    if value is None:
        value = (ctx.find_root().params.get("state_dir") or DEFAULT_STATE_DIR)
    return Path(value).expanduser().resolve()


def _from_group(ctx: click.Context, name: str, value: Any) -> Any:
    return value if value is not None else ctx.find_root().params.get(name)


# ---------------------------------------------------------------------------- output


def format_summary(st: dict[str, Any]) -> str:
    k, ioc, gw = st["kafka"], st["ioc"], st["gateway"]
    kafka_where = (f"{k['bootstrap']}  (embedded, pid {k['pid']}, log {k['log']})" if k["embedded"]
                   else f"{k['bootstrap']}  (external)")
    sec = st.get("security")
    lines = [
        "k2eg local stack is ready",
        f"  Kafka     {kafka_where}",
        *([f"  security  {sec['protocol']} {sec['mechanism']}, users {', '.join(sec['users'])}"
           + (f", CA {sec['ca']}" if sec.get("ca") else "") + " (client login in the environment file)"]
          if sec else []),
        f"  IOC       CA {ioc['ca']}, PVA {ioc['pva']}  (pid {ioc['pid']}, log {ioc['log']})",
        f"  gateway   command topic {st['cmd_topic']}  (pid {gw['pid']}, log {gw['log']})",
        *([f"  archiver  {st['archiver']['http']}  (pid {st['archiver']['pid']}, log {st['archiver']['log']})"]
          if st.get("archiver") else []),
        "",
        f"Client environment '{st['environment']}': {st['env_file']}",
        "  (or: eval \"$(k2eg-stack env --state-dir " + shlex.quote(st["state_dir"]) + ")\")",
    ]
    lines += [f"  export {key}={shlex.quote(v)}" for key, v in sorted(st["client_env"].items())]
    return "\n".join(lines)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("k2eg-stack: %(message)s"))
    lg = logging.getLogger("k2eg.stack")
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False


# ---------------------------------------------------------------------------- commands


def _stack_options(f):
    f = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help=f"where logs, data and stack.json go (default ./{DEFAULT_STATE_DIR})")(f)
    f = click.option("--kafka-bootstrap", metavar="HOST:PORT", default=None,
                     help="use this Kafka instead of starting an embedded broker")(f)
    f = click.option("--bulk", type=click.IntRange(min=0), default=None,
                     help="also serve N counting PVs bulk:000... (load tests)")(f)
    # Hidden: another gateway build, or a stand-in in tests; it must print the ready line on stderr.
    f = click.option("--gateway-command", default=None, hidden=True,
                     help="command line of the gateway instead of 'python -m k2eg.gateway'")(f)
    f = click.option("--secure", is_flag=True, default=None,
                     help="the broker requires a SASL login over TLS; the gateway and the client "
                          "environment file get their own users")(f)
    f = click.option("--sasl-mechanism", type=click.Choice(["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"]),
                     default=None, help="with --secure (default SCRAM-SHA-256)")(f)
    f = click.option("--tls/--no-tls", default=None, help="with --secure: SASL_SSL (default) or SASL_PLAINTEXT")(f)
    f = click.option("--archiver/--no-archiver", default=None,
                     help="also run k2eg-archiver (embedded store under the state dir, HTTP retrieval); default on")(f)
    return f


def _security(ctx: click.Context, secure: bool | None, sasl_mechanism: str | None,
              tls: bool | None) -> dict[str, Any]:
    """Stack keyword arguments of the security options, from the subcommand or the group."""
    return {"secure": bool(secure or ctx.find_root().params.get("secure")),
            "mechanism": _from_group(ctx, "sasl_mechanism", sasl_mechanism) or "SCRAM-SHA-256",
            "tls": _from_group(ctx, "tls", tls) is not False}


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_stack_options
@click.pass_context
def main(ctx: click.Context, state_dir: Path | None, kafka_bootstrap: str | None, bulk: int | None,
         gateway_command: str | None, secure: bool | None, sasl_mechanism: str | None, tls: bool | None,
         archiver: bool | None) -> None:
    """Kafka + demo IOC + k2eg gateway on this machine (loopback only). Default command: run."""
    if ctx.invoked_subcommand in (None, "run", "start"):
        from k2eg.extras import missing_extra

        why = missing_extra("k2eg-stack")
        if why is not None:  # installed without the EPICS libraries: one sentence, not an import traceback
            click.echo(why, err=True)
            ctx.exit(2)
    _setup_logging()
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@main.command()
@_stack_options
@click.argument("gateway_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, state_dir: Path | None = None, kafka_bootstrap: str | None = None,
        bulk: int | None = None, gateway_command: str | None = None, secure: bool | None = None,
        sasl_mechanism: str | None = None, tls: bool | None = None, archiver: bool | None = None,
        gateway_args: Sequence[str] = ()) -> None:
    """Run the stack in the foreground until Ctrl-C. Arguments after -- go to the gateway."""
    gateway_command = _from_group(ctx, "gateway_command", gateway_command)
    code = run_foreground(_state_dir(ctx, state_dir), _from_group(ctx, "kafka_bootstrap", kafka_bootstrap),
                          _from_group(ctx, "bulk", bulk) or 0, list(gateway_args),
                          shlex.split(gateway_command) if gateway_command else None,
                          archiver=_from_group(ctx, "archiver", archiver) is not False,
                          **_security(ctx, secure, sasl_mechanism, tls))
    ctx.exit(code)


def run_foreground(state_dir: Path, kafka_bootstrap: str | None, bulk: int, gateway_args: list[str],
                   gateway_cmd: list[str] | None = None, archiver: bool = True, **security: Any) -> int:
    existing = read_state(state_dir)
    if runner_alive(existing):
        click.echo(f"k2eg-stack: a stack is already running from {state_dir} (pid {existing['pid']}); "
                   f"stop it with: k2eg-stack stop --state-dir {shlex.quote(str(state_dir))}", err=True)
        return 1
    if existing is not None:  # its runner died without cleaning up
        for what in kill_leftovers(existing):
            click.echo(f"k2eg-stack: killed {what} left over by an earlier run", err=True)
        remove_state(state_dir)

    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # respect nohup
        signal.signal(signal.SIGHUP, _raise_terminated)
    stack: Stack | None = None
    code = 0
    try:
        stack = Stack(state_dir, kafka_bootstrap=kafka_bootstrap, bulk=bulk, gateway_args=gateway_args,
                      gateway_cmd=gateway_cmd, archiver=archiver, **security)
        click.echo(f"k2eg-stack: starting in {state_dir} ...", err=True)
        stack.start()
        st = stack.describe()
        st.update(pid=os.getpid(), started=time.time())
        write_state(state_dir, st)
        click.echo(format_summary(st))
        click.echo("\nPress Ctrl-C to stop.", err=True)
        while True:
            time.sleep(0.5)
            why = stack.failed()
            if why:
                click.echo(f"k2eg-stack: {why}; stopping the stack", err=True)
                code = 1
                break
    except (KeyboardInterrupt, _Terminated):
        pass
    except StackError as e:
        click.echo(f"k2eg-stack: {e}", err=True)
        code = 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and orphan a JVM.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if stack is not None:
            click.echo("k2eg-stack: stopping ...", err=True)
            try:
                stack.stop()
            except StackError as e:
                click.echo(f"k2eg-stack: {e}", err=True)
                code = 1
        remove_state(state_dir, os.getpid())
    return code


@main.command()
@_stack_options
@click.option("--timeout", type=float, default=600, show_default=True,
              help="seconds to wait for the stack (the first start downloads Kafka)")
@click.argument("gateway_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def start(ctx: click.Context, state_dir: Path | None, kafka_bootstrap: str | None, bulk: int | None,
          gateway_command: str | None, secure: bool | None, sasl_mechanism: str | None, tls: bool | None,
          archiver: bool | None, timeout: float, gateway_args: Sequence[str]) -> None:
    """Start the stack in the background and return once it is ready."""
    state_dir = _state_dir(ctx, state_dir)
    kafka_bootstrap = _from_group(ctx, "kafka_bootstrap", kafka_bootstrap)
    bulk = _from_group(ctx, "bulk", bulk) or 0
    gateway_command = _from_group(ctx, "gateway_command", gateway_command)
    security = _security(ctx, secure, sasl_mechanism, tls)
    existing = read_state(state_dir)
    if runner_alive(existing):
        click.echo(f"k2eg-stack: already running (pid {existing['pid']})", err=True)
        click.echo(format_summary(existing))
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "stack.log"
    cmd = [sys.executable, "-m", "k2eg.stack", "run", "--state-dir", str(state_dir)]
    if kafka_bootstrap:
        cmd += ["--kafka-bootstrap", kafka_bootstrap]
    if bulk:
        cmd += ["--bulk", str(bulk)]
    if gateway_command:
        cmd += ["--gateway-command", gateway_command]
    if security["secure"]:
        cmd += ["--secure", "--sasl-mechanism", security["mechanism"], "--tls" if security["tls"] else "--no-tls"]
    if _from_group(ctx, "archiver", archiver) is False:
        cmd += ["--no-archiver"]
    if gateway_args:
        cmd += ["--", *gateway_args]
    with open(log_path, "ab") as logf:
        log_start = logf.tell()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    click.echo(f"k2eg-stack: starting in the background (pid {proc.pid}, log {log_path}) ...", err=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            st = read_state(state_dir)
            if st is not None and st.get("pid") == proc.pid:
                click.echo(format_summary(st))
                click.echo(f"\nStop it with: k2eg-stack stop --state-dir {shlex.quote(str(state_dir))}", err=True)
                proc.returncode = 0  # it runs on: no "still running" warning when this process exits
                return
            if proc.poll() is not None:
                click.echo(f"k2eg-stack: the stack did not start; {log_path}:\n{_tail(log_path, 30, log_start)}",
                           err=True)
                ctx.exit(1)
            if time.monotonic() > deadline:
                raise click.ClickException(f"the stack was not ready within {timeout:g}s")
            time.sleep(0.2)
    except (KeyboardInterrupt, click.ClickException):
        if proc.poll() is None:  # take down the half-started stack rather than leave it behind
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise


@main.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"the stack's state dir (default ./{DEFAULT_STATE_DIR})")
@click.option("--timeout", type=float, default=90, show_default=True, help="seconds before parts are killed")
@click.pass_context
def stop(ctx: click.Context, state_dir: Path | None, timeout: float) -> None:
    """Stop a stack started with 'k2eg-stack start' (or running in another terminal)."""
    state_dir = _state_dir(ctx, state_dir)
    st = read_state(state_dir)
    if st is None:
        click.echo(f"k2eg-stack: no stack is running from {state_dir}", err=True)
        return
    if runner_alive(st):
        pid = st["pid"]
        click.echo(f"k2eg-stack: stopping the stack (pid {pid}) ...", err=True)
        os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, timeout):
            click.echo(f"k2eg-stack: pid {pid} did not stop within {timeout:g}s: killing it", err=True)
            _kill_now(pid)
    for what in kill_leftovers(st):
        click.echo(f"k2eg-stack: killed {what}", err=True)
    remove_state(state_dir)
    click.echo("k2eg-stack: stopped", err=True)


def _kill_now(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_gone(pid, 10)


@main.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"the stack's state dir (default ./{DEFAULT_STATE_DIR})")
@click.pass_context
def env(ctx: click.Context, state_dir: Path | None) -> None:
    """Print shell export lines for the running stack: eval "$(k2eg-stack env)"."""
    state_dir = _state_dir(ctx, state_dir)
    st = read_state(state_dir)
    if not runner_alive(st):
        click.echo(f"k2eg-stack: no stack is running from {state_dir} "
                   f"(no live runner behind {state_path(state_dir)}); start one with: k2eg-stack start", err=True)
        ctx.exit(1)
    assert st is not None
    click.echo(f"# k2eg local stack: Kafka {st['bootstrap']}, environment '{st['environment']}', "
               f"command topic {st['cmd_topic']}")
    for key, v in sorted(st["client_env"].items()):
        click.echo(f"export {key}={shlex.quote(v)}")


if __name__ == "__main__":
    main(prog_name="k2eg-stack")
