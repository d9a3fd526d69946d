"""The ``snapbus`` command line: thin commands over the library.

Every command that talks to Kafka takes ``--bootstrap-servers`` and ``--topic`` (also read
from ``SNAPBUS_BOOTSTRAP_SERVERS`` and ``SNAPBUS_TOPIC``) and the security options of
`snapbus.config.KafkaConfig`. ``demo`` and ``broker`` start an embedded broker when no
bootstrap servers are configured. Errors print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import logging
import re
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
from rich.console import Console
from rich.table import Table

from snapbus._signals import stop_on_signals
from snapbus.config import DEFAULT_TOPIC, KafkaConfig
from snapbus.errors import SnapbusError, ValidationError
from snapbus.snapshot import WorkspaceSnapshot, parse_uuid

__all__ = ["DEMO_TOPIC", "main", "parse_time"]

DEMO_TOPIC = "snapbus.demo"
"""The topic the demo uses on a configured cluster when --topic is not given."""

T = TypeVar("T")

_SECURITY_OPTIONS = (
    "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password",
    "ssl_cafile", "ssl_certfile", "ssl_keyfile",
)


class _Settings:
    """What the global options said; commands turn it into a `KafkaConfig`."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    @property
    def bootstrap_given(self) -> bool:
        return bool(self.options.get("bootstrap_servers"))

    def config(self, **overrides: Any) -> KafkaConfig:
        values = {k: v for k, v in self.options.items() if v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return KafkaConfig.from_env({}, **values)


class _BadInput(click.ClickException):
    """Bad input found after parsing (a value the library refused): exit status 2."""

    exit_code = 2


def _run(coro: Coroutine[Any, Any, T],
         run: Callable[[Coroutine[Any, Any, T]], T] = asyncio.run) -> T:
    """Run a coroutine (with `run`: asyncio's, or uvloop's); snapbus errors become one line
    on stderr.

    Invalid values (`ValidationError`) exit 2 like usage errors; anything else
    (unreachable cluster, missing topic, refused write, a port in use) exits 1.
    """
    try:
        return run(coro)
    except ValidationError as exc:
        raise _BadInput(str(exc)) from None
    except SnapbusError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _command(func: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Wrap an async command body so click can call it."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _run(func(*args, **kwargs))

    return wrapper


def _settings() -> _Settings:
    settings = click.get_current_context().find_object(_Settings)
    assert settings is not None
    return settings


def _config(**overrides: Any) -> KafkaConfig:
    try:
        return _settings().config(**overrides)
    except SnapbusError as exc:
        raise click.UsageError(str(exc)) from None


def _option_names(command: click.Command) -> dict[str, bool]:
    """A command's option names, each mapped to whether it takes a value."""
    names: dict[str, bool] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                names[name] = not (param.is_flag or param.count)
    return names


def _option_name(token: str, known: dict[str, bool]) -> str | None:
    """The option a token names (``--x=v``, ``-bHOST`` and ``-b`` forms), if known."""
    if token.startswith("--"):
        name = token.split("=", 1)[0]
    elif token.startswith("-") and len(token) > 1:
        name = token[:2]
    else:
        return None
    return name if name in known else None


def _hoist_global_options(group: click.Group, args: list[str]) -> list[str]:
    """Move global options typed after the command in front of it (``snapbus get -b H ID``).

    An option the command itself defines stays where it is; ``--`` ends the search.
    """
    globals_ = _option_names(group)
    start = 0
    while start < len(args) and args[start].startswith("-") and args[start] != "--":
        name = _option_name(args[start], globals_)
        start += 1
        if name is not None and globals_[name] and args[start - 1] == name:
            start += 1  # the option's value
    end = start
    command: click.Command = group
    while isinstance(command, click.Group) and end < len(args):
        sub = command.commands.get(args[end])
        if sub is None:
            return args
        command, end = sub, end + 1
    if command is group:
        return args
    own = _option_names(command)
    moved: list[str] = []
    rest: list[str] = []
    index = end
    while index < len(args):
        token = args[index]
        index += 1
        if token == "--":
            rest += args[index - 1:]
            break
        own_name = _option_name(token, own)
        global_name = None if own_name else _option_name(token, globals_)
        if global_name and globals_[global_name] and token == global_name \
                and index == len(args):
            raise click.UsageError(f"Option '{token}' requires an argument.")
        target = moved if global_name else rest
        target.append(token)
        name = own_name or global_name
        takes_value = own.get(own_name, False) if own_name else globals_.get(name or "", False)
        if name is not None and takes_value and token == name and index < len(args):
            target.append(args[index])
            index += 1
    return [*args[:start], *moved, *args[start:end], *rest]


class _Group(click.Group):
    """The root group: global options anywhere, and every error on one line.

    Click prints a usage error as four lines (usage, a hint, a blank line, the error); here
    every error is one line, ``Error: ...`` naming the flag, argument or value at fault, and
    exits 2 for bad input, 1 for any other failure, 130 on Ctrl-C.
    """

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(_hoist_global_options(self, argv), prog_name, complete_var,
                                  standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            if not standalone_mode:
                raise
            exc.show()  # a bare group: its help, as click prints it
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if not standalone_mode:
                raise
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            if not standalone_mode:
                raise
            click.echo("Aborted.", err=True)
            sys.exit(130)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_Group,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="snapbus")
@click.option("--bootstrap-servers", "-b", envvar="SNAPBUS_BOOTSTRAP_SERVERS",
              help="Kafka brokers, host:port[,host:port].  [env: SNAPBUS_BOOTSTRAP_SERVERS; "
                   "default 127.0.0.1:9092, or an embedded broker for demo]")
@click.option("--topic", "-t", envvar="SNAPBUS_TOPIC", default=DEFAULT_TOPIC,
              help="The compacted snapshot topic.  [env: SNAPBUS_TOPIC]")
@click.option("--security-protocol", envvar="SNAPBUS_SECURITY_PROTOCOL",
              type=click.Choice(["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]),
              help="Transport security.  [env: SNAPBUS_SECURITY_PROTOCOL]")
@click.option("--sasl-mechanism", envvar="SNAPBUS_SASL_MECHANISM",
              type=click.Choice(["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]),
              help="SASL mechanism.  [env: SNAPBUS_SASL_MECHANISM]")
@click.option("--sasl-username", envvar="SNAPBUS_SASL_USERNAME",
              help="SASL user.  [env: SNAPBUS_SASL_USERNAME]")
@click.option("--sasl-password", envvar="SNAPBUS_SASL_PASSWORD",
              help="SASL password.  [env: SNAPBUS_SASL_PASSWORD]")
@click.option("--ssl-cafile", envvar="SNAPBUS_SSL_CAFILE",
              help="CA bundle for the brokers' certificates.  [env: SNAPBUS_SSL_CAFILE]")
@click.option("--ssl-certfile", envvar="SNAPBUS_SSL_CERTFILE",
              help="Client certificate (mutual TLS).  [env: SNAPBUS_SSL_CERTFILE]")
@click.option("--ssl-keyfile", envvar="SNAPBUS_SSL_KEYFILE",
              help="Client key (mutual TLS).  [env: SNAPBUS_SSL_KEYFILE]")
@click.option("--history-topic", envvar="SNAPBUS_HISTORY_TOPIC",
              help="Non-compacted topic with every change; replay and history read it. "
                   " [env: SNAPBUS_HISTORY_TOPIC]")
@click.option("--timeout", "connect_timeout_s", type=float, default=15.0,
              envvar="SNAPBUS_CONNECT_TIMEOUT_S",
              help="Seconds to wait for the cluster before giving up.  "
                   "[env: SNAPBUS_CONNECT_TIMEOUT_S]")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, /, verbose: int, **options: Any) -> None:
    """snapbus: every pod sees the latest state of every workspace session."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiokafka logs every failed connection attempt as an error; snapbus reports the outcome.
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    ctx.obj = _Settings(options)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: datetime.datetime | None = None) -> datetime.datetime:
    """Parse ISO 8601 (naive means UTC), ``now``, or a relative time like ``-15m`` / ``-2h``.

    Raises:
        ValidationError: the text is none of those forms.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    value = text.strip()
    if value == "now":
        return now
    match = re.fullmatch(r"-(\d+(?:\.\d+)?)\s*([smhdw])", value)
    if match:
        return now - datetime.timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(
            f"cannot read time {text!r}: use ISO 8601 (2026-11-24T10:00:00Z), 'now', or a "
            "relative time like -15m, -2h, -1d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment


class _TimeType(click.ParamType):  # type: ignore[type-arg]
    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> datetime.datetime:
        if isinstance(value, datetime.datetime):
            return value
        try:
            return parse_time(str(value))
        except ValidationError as exc:
            self.fail(str(exc), param, ctx)


TIME = _TimeType()


# ---------------------------------------------------------------------------- broker, demo


@cli.command()
@click.option("--engine", type=click.Choice(["tansu", "kafka"]), default="tansu",
              show_default=True,
              help="tansu: Python only, memory storage; kafka: Apache Kafka (needs Java 17+ and "
                   "Maven).")
@click.option("--port", type=click.IntRange(1, 65535),
              help="Port of the plaintext listener (default: a free one).")
@click.option("--durable", is_flag=True,
              help="tansu only: store the log in an S3 server (moto) run by this command, so "
                   "it survives a broker crash and restart within the command. It is LOST "
                   "when the command ends: to keep data across runs use --engine kafka "
                   "--data-dir DIR.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="kafka only: keep the log in this directory; a new `snapbus broker "
                   "--engine kafka --data-dir DIR` finds the topics and sessions again.")
@click.option("--nodes", type=click.IntRange(1, 9), default=1, show_default=True,
              help="kafka only: run a cluster of this many KRaft nodes (each its own process).")
def broker(engine: str, port: int | None, durable: bool, data_dir: str | None,
           nodes: int) -> None:
    """Run an embedded Kafka broker in the foreground until Ctrl-C.

    Only --engine kafka --data-dir DIR keeps data after the command ends.
    """
    from snapbus.broker import EmbeddedBroker

    if durable and engine == "kafka":
        raise click.UsageError("--durable is a tansu option: the kafka engine keeps its log "
                               "on disk (give --data-dir DIR to keep it after the command)")
    if data_dir is not None and engine == "tansu":
        raise click.UsageError("--data-dir needs --engine kafka: tansu cannot keep data after "
                               "the command ends")
    if nodes > 1 and engine != "kafka":
        raise click.UsageError("--nodes needs --engine kafka")

    async def serve() -> None:
        stop = asyncio.Event()
        with stop_on_signals(stop):
            async with EmbeddedBroker(
                engine="kafka" if engine == "kafka" else "tansu", port=port,
                durable=durable and engine == "tansu", data_dir=data_dir, nodes=nodes,
            ) as embedded:
                click.echo(f"broker listening on {embedded.bootstrap_servers} ({engine})")
                if engine == "tansu":
                    kept = "until the command ends" if durable else "in memory only"
                    click.echo(f"  data is kept {kept}; --engine kafka --data-dir DIR keeps it "
                               "across runs", err=True)
                click.echo(f"  export SNAPBUS_BOOTSTRAP_SERVERS={embedded.bootstrap_servers}")
                sys.stdout.flush()
                await stop.wait()

    _run(serve())


@cli.command()
@click.option("--pods", type=click.IntRange(1, 50), default=3, help="Simulated pods.")
@click.option("--duration", type=click.FloatRange(0.5, 3600), default=10.0,
              help="Seconds of publishing.")
@click.option("--rate", type=click.FloatRange(0), default=50.0,
              help="Operations per second per pod (0: unthrottled).")
@click.option("--fetch-max-wait-ms", type=click.IntRange(1, 10_000), default=20,
              help="Views' fetch wait: lower is fresher, higher is idler.")
@click.option("--seed", type=int, help="Seed for a repeatable workload.")
def demo(pods: int, duration: float, rate: float, fetch_max_wait_ms: int,
         seed: int | None) -> None:
    """Simulate pods publishing session lifecycles while their views follow; check convergence.

    Without --bootstrap-servers an embedded broker is started (and a fresh topic used). With
    a cluster, the demo uses the topic snapbus.demo unless --topic is given explicitly.
    Exits 1 if any view did not converge to the expected final state.
    """
    from snapbus.demo import run_demo

    settings = _settings()
    config = None
    if settings.bootstrap_given:
        # Never write demo sessions into the real topic unless --topic asks for it.
        ctx = click.get_current_context().find_root()
        explicit = ctx.get_parameter_source("topic") is not click.core.ParameterSource.DEFAULT
        config = _config() if explicit else _config(topic=DEMO_TOPIC)
    click.echo(f"The {pods} pods are simulated in this one process: each is a publisher and "
               "a SnapshotView, talking to the broker as real pods would.")
    result = _run(run_demo(config, pods=pods, duration_s=duration, rate=rate,
                           fetch_max_wait_ms=fetch_max_wait_ms, seed=seed))
    if not result.converged:
        raise click.ClickException("the views did not converge")
    click.echo(_demo_next_steps(config))


def _demo_next_steps(config: KafkaConfig | None) -> str:
    """What to type after the demo: the broker and topic it used, or how to get one."""
    if config is None:
        return ("\nThe embedded broker stopped with the demo. Next, keep one running and look "
                "around:\n"
                "  snapbus broker                 # in one terminal; it prints the export line\n"
                "  export SNAPBUS_BOOTSTRAP_SERVERS=127.0.0.1:PORT\n"
                "  snapbus demo                   # sessions stay, on topic snapbus.demo\n"
                "  snapbus -t snapbus.demo ls     # then: watch, get ID, serve")
    where = f"-b {config.bootstrap_servers} -t {config.topic}"
    return ("\nNext, look at the sessions the demo left:\n"
            f"  snapbus {where} ls\n"
            f"  snapbus {where} watch          # live changes (run the demo again)\n"
            f"  snapbus {where} serve          # the HTTP sidecar on :8080")


# ---------------------------------------------------------------------------- topic


@cli.group()
def topic() -> None:
    """Create or inspect the compacted snapshot topic."""


@topic.command("ensure")
@click.option("--partitions", type=click.IntRange(1, 10_000), default=12,
              help="Partitions if the topic is created.")
@click.option("--allow-non-compacted", is_flag=True,
              help="Accept an existing topic whose cleanup.policy is not compact.")
@_command
async def topic_ensure(partitions: int, allow_non_compacted: bool) -> None:
    """Create the topic compacted if missing; fail if it exists and is not compacted."""
    from snapbus.topic import ensure_topic

    info = await ensure_topic(_config(), partitions=partitions,
                              allow_non_compacted=allow_non_compacted)
    verb = "created" if info.created else "exists"
    click.echo(f"topic {info.name} {verb}: {info.partitions} partitions, "
               f"cleanup.policy={info.cleanup_policy}")


@topic.command("describe")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_command
async def topic_describe(as_json: bool) -> None:
    """Show the topic's partitions and configuration."""
    from snapbus.topic import describe_topic

    info = await describe_topic(_config())
    if as_json:
        click.echo(json.dumps({"name": info.name, "partitions": info.partitions,
                               "cleanup_policy": info.cleanup_policy,
                               "compacted": info.compacted, "configs": info.configs}, indent=2))
        return
    click.echo(f"topic:          {info.name}")
    click.echo(f"partitions:     {info.partitions}")
    click.echo(f"cleanup.policy: {info.cleanup_policy}"
               + ("" if info.compacted else "  (NOT compacted: sessions can be lost)"))
    for name, value in sorted(info.configs.items()):
        click.echo(f"  {name} = {value}")


@topic.command("misplaced")
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines.")
def topic_misplaced(as_json: bool) -> None:
    """List records on another partition than their key's; exit status 1 if there are any.

    Such records come from a producer whose partitioner is not Kafka's default (murmur2):
    views ignore them (docs/misplaced-records.md). Reads the whole topic.
    """
    from snapbus.replay import find_misplaced

    found = _run(find_misplaced(_config()))
    for record in found:
        key = record.key.decode("utf-8", "replace")
        if as_json:
            click.echo(json.dumps({"partition": record.partition, "offset": record.offset,
                                   "expected_partition": record.expected_partition,
                                   "key": key, "timestamp_ms": record.timestamp_ms,
                                   "tombstone": record.tombstone}))
        else:
            kind = "tombstone" if record.tombstone else "record"
            click.echo(f"partition {record.partition} offset {record.offset}: {kind} of key "
                       f"{key} belongs on partition {record.expected_partition}")
    if not as_json:
        click.echo(f"{len(found)} misplaced record(s)")
    if found:
        raise SystemExit(1)


# ---------------------------------------------------------------------------- write

_FIELD_OPTIONS = ("session_id", "repo_id", "agent_id", "agent_name", "changeset_id", "intent",
                  "base_commit", "state", "mode")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _snapshot_error(exc: ValidationError, where: str | None = None) -> click.UsageError:
    """A snapshot's validation error, naming the flag (or the input position) at fault."""
    if where is not None:
        return click.BadParameter(f"{where}: {exc}", param_hint="--file")
    hint = _flag(exc.field) if exc.field in _FIELD_OPTIONS else None
    return click.BadParameter(str(exc), param_hint=hint)


def _json_items(source: str, text: str) -> list[tuple[str, Any]]:
    """Parse a JSON object, a JSON array or JSON Lines; each item with where it came from."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        lines = text.splitlines()
        first = next(line for line in lines if line.strip())
        try:
            json.loads(first)
        except ValueError:  # not JSON Lines either: report where the document breaks
            raise click.BadParameter(
                f"{source} line {whole.lineno} column {whole.colno}: not valid JSON: "
                f"{whole.msg}", param_hint="--file") from None
        items = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                items.append((f"{source} line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise click.BadParameter(
                    f"{source} line {number} column {exc.colno}: not valid JSON: {exc.msg}",
                    param_hint="--file") from None
        return items
    if isinstance(data, list):
        return [(f"{source} item {number}", item) for number, item in enumerate(data, 1)]
    return [(source, data)]


def _read_json_input(source: str) -> list[WorkspaceSnapshot]:
    """Snapshots from a JSON object, a JSON array, or JSON Lines ('-' is stdin)."""
    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"cannot read {source}: {exc.strerror}",
                                     param_hint="--file") from None
        except UnicodeDecodeError:
            raise click.BadParameter(f"{source} is not UTF-8 text",
                                     param_hint="--file") from None
    if not text.strip():
        raise click.BadParameter(f"{source} is empty", param_hint="--file")
    snapshots = []
    for where, item in _json_items(source, text):
        try:
            snapshots.append(WorkspaceSnapshot.from_input(item))
        except ValidationError as exc:
            raise _snapshot_error(exc, where) from None
    return snapshots


_ALLOW_NON_COMPACTED = click.option(
    "--allow-non-compacted", is_flag=True,
    help="Write even if the topic's cleanup.policy is not compact.")


def _publisher(allow_non_compacted: bool) -> Any:
    from snapbus.publisher import SnapshotPublisher

    return SnapshotPublisher(_config(), allow_non_compacted=allow_non_compacted)


@cli.command()
@click.option("--file", "-f", "file_source", metavar="FILE",
              help="Read snapshots from a JSON object, array or JSON Lines file ('-': stdin) "
                   "instead of the field flags.")
@click.option("--json", "json_source", metavar="FILE", hidden=True,
              help="Deprecated spelling of --file.")
@click.option("--session-id", help="Session UUID.  [default: a new one]")
@click.option("--repo-id", help="Repository UUID (required).")
@click.option("--agent-id", help="Agent identifier (required, not blank).")
@click.option("--agent-name", help="Agent display name.  [default: empty]")
@click.option("--changeset-id", help="Changeset UUID.  [default: a new one]")
@click.option("--intent", help="Intent text.  [default: empty]")
@click.option("--base-commit", help="Base commit hash.  [default: empty]")
@click.option("--state", help="Lifecycle state, not blank.  [default: active]")
@click.option("--mode", help="ephemeral or persistent, not blank.  [default: ephemeral]")
@_ALLOW_NON_COMPACTED
def publish(file_source: str | None, json_source: str | None, allow_non_compacted: bool,
            **fields: Any) -> None:
    """Publish a whole snapshot given by flags, or the snapshots of a JSON file.

    A snapshot replaces the session's previous one: omitted fields take their defaults.
    To change some fields of an existing session use `snapbus update`.
    """
    if json_source is not None:
        if file_source is not None:
            raise click.UsageError("give --file only (--json FILE is its old spelling)")
        click.echo("warning: publish --json FILE is deprecated; use --file FILE", err=True)
        file_source = json_source
    given = {name: value for name, value in fields.items() if value is not None}
    if file_source is not None:
        if given:
            flags = ", ".join(_flag(name) for name in given)
            raise click.UsageError(f"{flags} cannot be combined with --file: put the fields "
                                   "in the file, or change a session with `snapbus update`")
        snapshots = _read_json_input(file_source)
    else:
        for required in ("repo_id", "agent_id"):
            if required not in given:
                raise click.UsageError(f"{_flag(required)} is required (or give --file FILE)")
        try:
            snapshots = [WorkspaceSnapshot.from_input(given)]
        except ValidationError as exc:
            raise _snapshot_error(exc) from None

    async def send() -> None:
        async with _publisher(allow_non_compacted) as publisher:
            receipts = await publisher.publish_many(snapshots)
        for receipt in receipts:
            click.echo(f"published {receipt.session_id} to "
                       f"{receipt.topic}[{receipt.partition}]@{receipt.offset}")

    _run(send())


@cli.command()
@click.argument("session_id")
@click.option("--repo-id", help="New repository UUID.")
@click.option("--agent-id", help="New agent identifier.")
@click.option("--agent-name", help="New agent display name.")
@click.option("--changeset-id", help="New changeset UUID.")
@click.option("--intent", help="New intent text.")
@click.option("--base-commit", help="New base commit hash.")
@click.option("--state", help="New lifecycle state.")
@click.option("--mode", help="New mode.")
@_ALLOW_NON_COMPACTED
def update(session_id: str, allow_non_compacted: bool, **fields: Any) -> None:
    """Change some fields of an existing session; the others keep their values.

    Reads the session's latest snapshot (exit 1 if there is none), publishes it with the
    given fields changed and prints the result as JSON. Not atomic: a write by another
    process between the read and this publish is overwritten.
    """
    try:
        wanted = parse_uuid(session_id, field="SESSION_ID")
    except ValidationError as exc:
        raise click.BadParameter(str(exc), param_hint="SESSION_ID") from None
    changes = {name: value for name, value in fields.items() if value is not None}
    if not changes:
        raise click.UsageError("nothing to change: give at least one field flag, e.g. "
                               "--state submitted")

    async def send() -> WorkspaceSnapshot:
        async with _view() as view:
            current = view.get(wanted)
            if current is None:
                raise click.ClickException(
                    f"session {wanted} not found on topic {view.config.topic}: update changes "
                    "existing sessions (create one with `snapbus publish`)")
            try:
                changed: WorkspaceSnapshot = current.updated(changes)
            except ValidationError as exc:
                raise _snapshot_error(exc) from None
            async with _publisher(allow_non_compacted) as publisher:
                await publisher.publish(changed)
        return changed

    changed = _run(send())
    click.echo(json.dumps(changed.to_dict(), indent=2, ensure_ascii=False))


@cli.command()
@click.argument("session_ids", nargs=-1, required=True)
@_ALLOW_NON_COMPACTED
def evict(session_ids: tuple[str, ...], allow_non_compacted: bool) -> None:
    """Publish tombstones: the sessions disappear from every view.

    A tombstone is written whether or not the session is present (evicting is idempotent,
    like HTTP DELETE); the output says which sessions were absent. Exits 0 either way.
    """
    try:
        ids = [parse_uuid(s, field="SESSION_ID") for s in session_ids]
    except ValidationError as exc:
        raise click.BadParameter(str(exc), param_hint="SESSION_ID") from None

    async def send() -> None:
        async with _view() as view:
            present = {session_id: session_id in view for session_id in ids}
        async with _publisher(allow_non_compacted) as publisher:
            for session_id in ids:
                receipt = await publisher.evict(session_id)
                where = f"{receipt.topic}[{receipt.partition}]@{receipt.offset}"
                if present[session_id]:
                    click.echo(f"evicted {session_id} at {where}")
                else:
                    click.echo(f"absent {session_id} (was not there; tombstone written at "
                               f"{where})")

    _run(send())


# ---------------------------------------------------------------------------- read


def _view(**kwargs: Any) -> Any:
    from snapbus.view import SnapshotView

    return SnapshotView(_config(), ensure_topic=False, fetch_max_wait_ms=50, **kwargs)


def _console(file: TextIO | None = None) -> Console:
    """A console for tables: full width on a terminal, wide enough for ids elsewhere."""
    console = Console(file=file)
    return console if console.is_terminal else Console(file=file, width=200)


def _agent(snapshot: WorkspaceSnapshot) -> str:
    """``name (id)``, or the id alone when no name was set."""
    if snapshot.agent_name:
        return f"{snapshot.agent_name} ({snapshot.agent_id})"
    return snapshot.agent_id


_SORT_KEYS: dict[str, Callable[[WorkspaceSnapshot], tuple[str, ...]]] = {
    "session": lambda s: (s.key,),
    "repo": lambda s: (s.repo_key, s.agent_id, s.key),
    "agent": lambda s: (s.agent_id, s.key),
    "state": lambda s: (s.state, s.key),
}


def _table(snapshots: list[WorkspaceSnapshot]) -> Table:
    """Sessions in the given order; labels never break, only the intent is shortened."""
    table = Table(show_lines=False)
    for column in ("session_id", "repo_id"):
        table.add_column(column, no_wrap=True, min_width=36)
    rows = [(str(s.session_id), str(s.repo_id), _agent(s), s.state, s.mode,
             s.intent if len(s.intent) <= 60 else s.intent[:57] + "...") for s in snapshots]
    for index, column in enumerate(("agent", "state", "mode"), 2):
        table.add_column(column, no_wrap=True, min_width=_widest(column, rows, index))
    table.add_column("intent", no_wrap=True, overflow="ellipsis", ratio=1)
    for row in rows:
        table.add_row(*row)
    return table


def _print_table(console: Console, table: Table) -> None:
    """Print a table without breaking a word: ids and labels are never cut or wrapped; the
    intent column gives way first, and when even the rest is wider than the console the
    lines run past its edge (as kubectl's do) instead."""
    # each column: its minimum (the intent at least 10), one space of padding each side and
    # one border line
    needed = sum((column.min_width or 10) + 3 for column in table.columns) + 1
    width = console.width
    console.width = max(width, needed)
    try:
        console.print(table)
    finally:
        console.width = width


def _widest(header: str, rows: Sequence[tuple[str, ...]], index: int, cap: int = 40) -> int:
    """The width a label column needs so that no value is cut (up to `cap`)."""
    return min(cap, max([len(header), *(len(row[index]) for row in rows)]))


@cli.command()
@click.argument("session_id")
@_command
async def get(session_id: str) -> None:
    """Print one session's latest snapshot as JSON (exit 1 if it is not there)."""
    try:
        wanted = parse_uuid(session_id, field="SESSION_ID")
    except ValidationError as exc:
        raise click.BadParameter(str(exc), param_hint="SESSION_ID") from None
    async with _view() as view:
        snapshot = view.get(wanted)
    if snapshot is None:
        raise click.ClickException(f"session {wanted} not found on topic {view.config.topic}")
    click.echo(json.dumps(snapshot.to_dict(), indent=2, ensure_ascii=False))


@cli.command("ls")
@click.option("--repo", "repo_id", help="Only sessions on this repository UUID.")
@click.option("--agent", "agent_id", help="Only sessions of this agent id.")
@click.option("--state", help="Only sessions in this state.")
@click.option("--as-of", type=TIME,
              help="Show the sessions as they were at this time (replays the log).")
@click.option("--sort", type=click.Choice(list(_SORT_KEYS)), default="session",
              help="Order by session id, or by repo/agent/state then session id.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@_command
async def list_sessions(repo_id: str | None, agent_id: str | None, state: str | None,
                        as_of: datetime.datetime | None, sort: str, as_json: bool) -> None:
    """List the latest snapshot of every session, optionally filtered or as of a time.

    Table and JSON list the sessions in the same order (--sort; by session id unless told).
    """
    if repo_id is not None:
        try:
            repo_id = str(parse_uuid(repo_id, field="--repo"))
        except ValidationError as exc:
            raise click.BadParameter(str(exc), param_hint="--repo") from None
    if as_of is not None:
        from snapbus.replay import rebuild

        found = [s for s in (await rebuild(_config(), as_of=as_of)).values()
                 if (repo_id is None or s.repo_key == repo_id)
                 and (agent_id is None or s.agent_id == agent_id)
                 and (state is None or s.state == state)]
    else:
        async with _view() as view:
            found = view.select(repo_id=repo_id, agent_id=agent_id, state=state)
    found = sorted(found, key=_SORT_KEYS[sort])
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in found], indent=2, ensure_ascii=False))
    else:
        console = _console()
        _print_table(console, _table(found))
        console.print(f"{len(found)} session(s)")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines.")
@click.option("--count", type=click.IntRange(1), help="Exit after this many changes.")
@_command
async def watch(as_json: bool, count: int | None) -> None:
    """Print changes as they happen, until Ctrl-C (or --count changes)."""
    async with _view() as view:
        if not as_json:
            click.echo(f"watching {view.config.topic} ({len(view)} sessions); Ctrl-C to stop",
                       err=True)
        seen = 0
        async with view.changes() as stream:
            async for change in stream:
                if as_json:
                    click.echo(json.dumps({
                        "session_id": str(change.session_id),
                        "old": change.old.to_dict() if change.old else None,
                        "new": change.new.to_dict() if change.new else None,
                    }, ensure_ascii=False), nl=True)
                else:
                    kind = ("created" if change.old is None
                            else "deleted" if change.new is None else "updated")
                    now = change.new or change.old
                    assert now is not None
                    click.echo(f"{kind:8} {change.session_id} state={now.state} "
                               f"agent={_agent(now)} repo={now.repo_id}")
                sys.stdout.flush()
                seen += 1
                if count is not None and seen >= count:
                    return


# ---------------------------------------------------------------------------- replay

def _event_row(event: Any) -> tuple[str, ...]:
    when = event.timestamp.isoformat(timespec="milliseconds") if event.timestamp else "-"
    snapshot = event.snapshot
    if snapshot is None:
        return (when, f"{event.partition}@{event.offset}", str(event.session_id), "DELETED",
                "", "")
    return (when, f"{event.partition}@{event.offset}", str(event.session_id), snapshot.state,
            _agent(snapshot), snapshot.intent[:50])


_EVENT_ORDERS: dict[str, Callable[[Any], tuple[Any, ...]]] = {
    "time": lambda e: (e.timestamp_ms < 0, e.timestamp_ms, e.partition, e.offset),
    "partition": lambda e: (e.partition, e.offset),
}


def _events_table(events: list[Any]) -> Table:
    """Events as a table, in the order given; labels never break, the intent is cut."""
    table = Table()
    rows = [_event_row(event) for event in events]
    for index, column in enumerate(("timestamp", "partition@offset", "session_id", "state",
                                    "agent")):
        table.add_column(column, no_wrap=True, min_width=_widest(column, rows, index))
    table.add_column("intent", no_wrap=True, overflow="ellipsis", ratio=1)
    for row in rows:
        table.add_row(*row)
    return table


@cli.command("replay")
@click.option("--since", type=TIME, help="From this time (ISO 8601, or relative like -15m).")
@click.option("--until", type=TIME, help="Up to (not including) this time.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "table"]), default="jsonl",
              help="Output format.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file instead of stdout.")
@click.option("--sort", type=click.Choice(list(_EVENT_ORDERS)), default="time",
              help="table: by record time (then partition, offset), or by partition and "
                   "offset.")
@click.option("--no-progress", is_flag=True, help="Do not show a progress bar on stderr.")
def replay_command(since: datetime.datetime | None, until: datetime.datetime | None,
                   fmt: str, output: str | None, sort: str, no_progress: bool) -> None:
    """Export the log's events between two times.

    jsonl streams each partition in offset order (partitions interleaved as read; every
    session's events stay in order, which is what `import` needs). table sorts (--sort).
    """
    if since and until and since >= until:
        raise click.BadParameter("--since must be before --until", param_hint="--since")
    config = _config()
    with contextlib.ExitStack() as stack:
        try:
            out = (stack.enter_context(open(output, "w", encoding="utf-8")) if output
                   else sys.stdout)
        except OSError as exc:
            raise click.BadParameter(f"cannot write {output}: {exc.strerror}",
                                     param_hint="'--output' / '-o'") from None
        count = _run(_replay_to(config, out, since, until, fmt, not no_progress, sort))
    click.echo(f"{count} event(s)", err=True)


async def _replay_to(config: KafkaConfig, out: TextIO, since: datetime.datetime | None,
                     until: datetime.datetime | None, fmt: str, show_progress: bool,
                     sort: str = "time") -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from snapbus.replay import replay, write_jsonl

    stderr = Console(stderr=True)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=stderr,
                  disable=not (show_progress and stderr.is_terminal), transient=True) as bar:
        task = bar.add_task(f"replaying {config.topic}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        events = replay(config, since=since, until=until, progress=progress)
        if fmt == "table":
            collected = sorted([event async for event in events], key=_EVENT_ORDERS[sort])
            _print_table(_console(out), _events_table(collected))
            return len(collected)
        return await write_jsonl(events, out)


@cli.command("history")
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines.")
@_command
async def history_command(session_id: str, as_json: bool) -> None:
    """Show every change of one session that is still in the log."""
    from snapbus.replay import event_to_json, history

    try:
        wanted = parse_uuid(session_id, field="SESSION_ID")
    except ValidationError as exc:
        raise click.BadParameter(str(exc), param_hint="SESSION_ID") from None
    events = await history(_config(), wanted)
    if not events:
        raise click.ClickException(f"no records of session {wanted} in the log")
    if as_json:
        for event in events:
            click.echo(json.dumps(event_to_json(event), ensure_ascii=False))
        return
    _print_table(_console(), _events_table(events))


_IMPORT_CHUNK = 1000
"""Events published per round of an import (and per progress-bar step)."""


def _export_event(line: str) -> tuple[uuid.UUID, WorkspaceSnapshot | None]:
    """One line of a `snapbus replay` export: the session and its snapshot (None: deleted).

    Raises:
        ValueError: the line is not an export event (the message says what is wrong).
    """
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"column {exc.colno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, found {type(data).__name__}")
    missing = [key for key in ("session_id", "snapshot") if key not in data]
    if missing:
        raise ValueError(f"not an export event: no {' or '.join(repr(k) for k in missing)} "
                         "key (import reads the JSON Lines of `snapbus replay`; "
                         "to publish plain snapshots use `snapbus publish --file`)")
    session = parse_uuid(data["session_id"], field="session_id")
    value = data["snapshot"]
    if value is None:
        return session, None
    snapshot = WorkspaceSnapshot.from_dict(value)
    if snapshot.session_id != session:
        raise ValueError(f"session_id {session} differs from the snapshot's "
                         f"{snapshot.session_id}")
    return session, snapshot


@cli.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--no-progress", is_flag=True, help="Do not show a progress bar on stderr.")
@_ALLOW_NON_COMPACTED
def import_command(source: str, no_progress: bool, allow_non_compacted: bool) -> None:
    """Publish the events of a JSON Lines export (from `snapbus replay`) to the topic.

    Snapshots are published and tombstones evict, each session's events in file order, so
    a view of the target topic ends equal to the exported state. The whole file is checked
    before anything is published; an empty file is an error.
    """
    items: list[tuple[uuid.UUID, WorkspaceSnapshot | None]] = []
    with contextlib.ExitStack() as stack:
        handle = sys.stdin if source == "-" else stack.enter_context(
            open(source, encoding="utf-8"))
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                items.append(_export_event(line))
            except (ValueError, TypeError) as exc:
                raise click.BadParameter(f"{source} line {number}: {exc}",
                                         param_hint="SOURCE") from None
    if not items:
        raise click.BadParameter(f"{source} holds no events", param_hint="SOURCE")
    _run(_import(_config(), items, show_progress=not no_progress,
                 allow_non_compacted=allow_non_compacted))


async def _import(config: KafkaConfig, items: list[tuple[uuid.UUID, WorkspaceSnapshot | None]],
                  *, show_progress: bool = False, allow_non_compacted: bool = False) -> None:
    """Publish in rounds: each run of snapshots in one pipelined batch, tombstones together.

    Rounds follow file order, so a session's records keep their order.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from snapbus.publisher import SnapshotPublisher

    stderr = Console(stderr=True)
    async with SnapshotPublisher(config, allow_non_compacted=allow_non_compacted) as publisher:
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=stderr,
                      disable=not (show_progress and stderr.is_terminal),
                      transient=True) as bar:
            task = bar.add_task(f"importing into {config.topic}", total=len(items))
            start = 0
            while start < len(items):
                deleting = items[start][1] is None
                end = start
                while (end < len(items) and end - start < _IMPORT_CHUNK
                       and (items[end][1] is None) == deleting):
                    end += 1
                if deleting:
                    await asyncio.gather(*(publisher.evict(session)
                                           for session, _ in items[start:end]))
                else:
                    await publisher.publish_many(
                        snapshot for _, snapshot in items[start:end] if snapshot is not None)
                bar.update(task, completed=end)
                start = end
    click.echo(f"imported {len(items)} event(s) into {config.topic}")


# ---------------------------------------------------------------------------- schema


@cli.group()
def schema() -> None:
    """Work with the Avro schemas in schemas/."""


@schema.command("check")
@click.argument("candidate", type=click.Path(exists=True, dir_okay=False))
@click.option("--schemas", "folder", type=click.Path(exists=True, file_okay=False),
              help="Folder of known schemas (default: the shipped ones).")
def schema_check(candidate: str, folder: str | None) -> None:
    """Check that CANDIDATE can live beside the known schemas (read and be read both ways)."""
    from snapbus.schema import SchemaStore, check_compatibility, load_schema

    try:
        new = load_schema(candidate)
        store = SchemaStore.from_dir(folder)
    except SnapbusError as exc:
        raise click.ClickException(str(exc)) from None
    known = [s for s in store if s.fingerprint != new.fingerprint]
    problems = check_compatibility(new, known)
    if problems:
        for problem in problems:
            click.echo(f"incompatible: {problem}", err=True)
        raise click.ClickException(f"{candidate} is not compatible with {len(known)} known "
                                   "schema(s)")
    click.echo(f"{candidate} is compatible with {len(known)} known schema(s) "
               f"(fingerprint {new.fingerprint.hex()})")


# ---------------------------------------------------------------------------- serve


class _Refused(click.ClickException):
    """A usage error told in one line (no usage text): exit status 2."""

    exit_code = 2


@cli.command()
@click.option("--host", default="127.0.0.1",
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080,
              help="Port to listen on (0: a free one).")
@click.option("--allow-writes", is_flag=True,
              help="Enable PUT, PATCH and DELETE /sessions/{id} (default: read-only).")
@click.option("--ttl", "ttl_s", type=click.FloatRange(0, min_open=True),
              help="Hide sessions whose latest record is older than this many seconds.")
@click.option("--janitor", is_flag=True,
              help="With --ttl: also publish tombstones for expired sessions (needs write "
                   "access to the topic, even without --allow-writes).")
@click.option("--janitor-interval", type=click.FloatRange(0.1), default=30.0,
              help="Seconds between janitor sweeps.")
@click.option("--fetch-max-wait-ms", type=click.IntRange(1, 10_000), default=100,
              help="The view's fetch wait: lower is fresher, higher is idler.")
@click.option("--redis-port", type=click.IntRange(0, 65535),
              help="Also serve the Redis protocol on this port, for the upstream server's "
                   "Valkey URL (docs/redis-sidecar.md).")
@click.option("--redis-upstream", metavar="URL",
              help="redis://host:port of a Redis/Valkey for keys that are not snapshots "
                   "(graph, files); without it they are refused or answered as absent.")
@click.option("--no-http", is_flag=True, help="With --redis-port: serve no HTTP.")
@click.option("--log-json", is_flag=True, help="Log JSON lines on stderr.")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="File holding the bearer token every /sessions and /changes request must "
                   "send (Authorization: Bearer ...); never give the token itself as a flag.  "
                   "[env: SNAPBUS_SERVE_TOKEN holds the token; this file wins]")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="Serve HTTPS, and TLS on --redis-port (rediss://), with this PEM "
                   "certificate chain (and key, unless --tls-key).")
@click.option("--tls-key", type=click.Path(dir_okay=False),
              help="The PEM private key of --tls-cert (unencrypted).")
def serve(host: str, port: int, allow_writes: bool, ttl_s: float | None, janitor: bool,
          janitor_interval: float, fetch_max_wait_ms: int, redis_port: int | None,
          redis_upstream: str | None, no_http: bool, log_json: bool,
          token_file: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """Serve the sessions over HTTP for pods that do not run Python, until Ctrl-C.

    GET /sessions/{id}, /sessions?repo=&agent=&state=, /changes (server-sent events),
    /metrics (Prometheus), /healthz and /readyz; with --allow-writes also PUT, PATCH and
    DELETE /sessions/{id}. With --redis-port also the Redis protocol, for the upstream
    server's Valkey cache (docs/redis-sidecar.md). Prints `serving URL` once the view is live.
    Needs the extra snapbus[serve].

    With a token, every /sessions and /changes request needs it, and Redis clients must AUTH
    with it. Without one, --allow-writes beyond loopback is refused, and reads beyond loopback
    are served with a warning.
    """
    if janitor and ttl_s is None:
        raise click.UsageError("--janitor needs --ttl")
    if tls_key is not None and tls_cert is None:
        raise click.UsageError("--tls-key needs --tls-cert")
    if redis_port is None and (no_http or redis_upstream):
        raise click.UsageError("--no-http and --redis-upstream need --redis-port")
    try:
        from snapbus.serve import check_exposure, read_token, run_server
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        token = read_token(token_file)
        check_exposure(host, has_token=token is not None, allow_writes=allow_writes)
    except SnapbusError as exc:
        raise _Refused(str(exc)) from None
    if log_json:
        from snapbus.logs import configure_logging

        configure_logging(json=True, level=logging.getLogger().level)

    def ready(url: str) -> None:
        # announced once the view is live: a failure to start is the only output
        mode = "read-write" if allow_writes else "read-only"
        mode += ", bearer token required" if token is not None else ""
        click.echo(f"serving {url} ({mode}); Ctrl-C to stop")
        sys.stdout.flush()

    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if redis_port is not None:
        with contextlib.suppress(ImportError):  # snapbus[resp]: a faster event loop
            import uvloop

            run = uvloop.run
    _run(run_server(_config(), host=host, port=port, allow_writes=allow_writes, ttl_s=ttl_s,
                    janitor=janitor, janitor_interval_s=janitor_interval,
                    fetch_max_wait_ms=fetch_max_wait_ms, redis_port=redis_port,
                    redis_upstream=redis_upstream, http=not no_http, on_ready=ready,
                    token=token, tls_certfile=tls_cert, tls_keyfile=tls_key),
         run)


def main() -> None:
    """Entry point of the ``snapbus`` console script."""
    cli(prog_name="snapbus")
