# -*- test-case-name: tests.test_admin -*-
"""
C{anvil-admin}: manage regions, tenants, apps, policies and buckets.

It reads the same configuration as the node (C{--config}, the environment)
and reaches the databases the same way (L{anvil.meta.connect.open_metadata}):
the configured URLs, or the embedded PostgreSQL of the data directory
(C{--data-dir}), which it starts for the duration of the command when no
node is running it.

Every command accepts C{--json} (before or after the command) and then
prints one JSON document.  Errors are one line on standard error,
C{anvil-admin: error: ...}, with exit status 2; success exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO

from anvil.config import ConfigError, load_config
from anvil.errors import AnvilError
from anvil.meta.store import ACTIONS, GlobalStore

PROG = "anvil-admin"

#: Exit status for operator errors (bad arguments, unknown names,
#: duplicates, configuration and database problems), as argparse uses.
EXIT_ERROR = 2
#: Exit status for unexpected internal errors.
EXIT_INTERNAL = 1


class UsageError(Exception):
    """
    The command line could not be parsed; the message is argparse's.
    """


class _Parser(argparse.ArgumentParser):
    """
    An argument parser that raises L{UsageError} instead of printing the
    usage and exiting, so every error ends up as the same single line.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# -- output ----------------------------------------------------------------


def _human_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class _Output:
    """
    Writes a command's result as a table, a confirmation, or JSON.
    """

    def __init__(self, stream: TextIO, as_json: bool) -> None:
        self._stream = stream
        self.as_json = as_json

    def json(self, document: object) -> None:
        self._stream.write(json.dumps(document, default=_json_default, indent=2) + "\n")

    def line(self, text: str) -> None:
        self._stream.write(text + "\n")

    def table(
        self,
        rows: Sequence[Mapping[str, Any]],
        columns: Sequence[tuple[str, Callable[[Mapping[str, Any]], object]]],
    ) -> None:
        """
        Print C{rows} (or, with C{--json}, the rows themselves) as an
        aligned table with one column per C{(header, getter)}.
        """
        if self.as_json:
            self.json(list(rows))
            return
        cells = [[header for header, _ in columns]]
        cells += [[str(get(row)) for _, get in columns] for row in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
        for r in cells:
            self.line("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# -- commands ----------------------------------------------------------------

_Handler = Callable[[GlobalStore, argparse.Namespace, _Output], Awaitable[None]]


async def _region_create(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    created = await store.create_region(args.name)
    if out.as_json:
        out.json({"region": args.name, "created": created})
    elif created:
        out.line(f"Created region {args.name!r}.")
    else:
        out.line(f"Region {args.name!r} already exists.")


async def _region_list(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    out.table(
        await store.list_regions(),
        [("NAME", lambda r: r["name"]), ("CREATED", lambda r: _human_time(r["created_at"]))],
    )


async def _tenant_create(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    tenant = await store.create_tenant(args.name)
    if out.as_json:
        out.json(tenant)
    else:
        out.line(f"Created tenant {args.name!r}.")


async def _tenant_list(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    out.table(
        await store.list_tenants(),
        [
            ("NAME", lambda r: r["name"]),
            ("APPS", lambda r: r["apps"]),
            ("BUCKETS", lambda r: r["buckets"]),
            ("CREATED", lambda r: _human_time(r["created_at"])),
        ],
    )


async def _app_create(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    app = await store.create_app(args.tenant_name, args.app_name)
    if out.as_json:
        out.json(app)
        return
    out.line(f"Created app {args.app_name!r} in tenant {args.tenant_name!r}.")
    out.line(f"Client id:     {app['client_id']}")
    out.line(f"Client secret: {app['client_secret']}")
    out.line("The secret is shown only now: store it safely.")


async def _app_list(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    out.table(
        await store.list_apps(args.tenant_name),
        [
            ("NAME", lambda r: r["name"]),
            ("TENANT", lambda r: r["tenant_name"]),
            ("CLIENT ID", lambda r: r["client_id"]),
            ("POLICIES", lambda r: r["policies"]),
            ("CREATED", lambda r: _human_time(r["created_at"])),
            ("SECRET ROTATED", lambda r: _human_time(r["secret_rotated_at"])),
        ],
    )


async def _app_delete(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    await store.delete_app(args.app_name)
    if out.as_json:
        out.json({"app_name": args.app_name, "deleted": True})
    else:
        out.line(f"Deleted app {args.app_name!r}; its credentials no longer work.")


async def _app_rotate_secret(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    secret = await store.rotate_secret(args.app_name)
    app = await store.get_app(args.app_name)
    if out.as_json:
        out.json(
            {
                "app_name": args.app_name,
                "tenant_name": app["tenant_name"],
                "client_id": app["client_id"],
                "client_secret": secret,
            }
        )
        return
    out.line(f"New secret for app {args.app_name!r}; the old one no longer works.")
    out.line(f"Client id:     {app['client_id']}")
    out.line(f"Client secret: {secret}")
    out.line("The secret is shown only now: store it safely.")


async def _policy_grant(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    await store.grant(args.app_name, args.action, args.resource)
    if out.as_json:
        out.json({"app_name": args.app_name, "action": args.action, "resource": args.resource, "granted": True})
    else:
        out.line(f"Granted {args.action!r} on {args.resource!r} to app {args.app_name!r}.")


async def _policy_revoke(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    await store.revoke(args.app_name, args.action, args.resource)
    if out.as_json:
        out.json({"app_name": args.app_name, "action": args.action, "resource": args.resource, "revoked": True})
    else:
        out.line(f"Revoked {args.action!r} on {args.resource!r} from app {args.app_name!r}.")


async def _policy_list(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    out.table(
        await store.list_policies(args.app_name),
        [
            ("APP", lambda r: r["app_name"]),
            ("TENANT", lambda r: r["tenant_name"]),
            ("ACTION", lambda r: r["action"]),
            ("RESOURCE", lambda r: r["resource"]),
        ],
    )


async def _bucket_list(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    out.table(
        await store.list_buckets(args.tenant_name),
        [
            ("NAME", lambda r: r["name"]),
            ("TENANT", lambda r: r["tenant_name"]),
            ("REGION", lambda r: r["region"]),
            ("PUBLIC", lambda r: "yes" if r["public"] else "no"),
            ("CREATED", lambda r: _human_time(r["created_at"])),
        ],
    )


async def _bucket_set_public_access(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    await store.set_public_access(args.bucket, args.public)
    if out.as_json:
        out.json({"bucket": args.bucket, "public": args.public})
    elif args.public:
        out.line(f"Bucket {args.bucket!r} now allows anonymous GetObject and HeadObject.")
    else:
        out.line(f"Bucket {args.bucket!r} no longer allows anonymous access.")


# -- tasks ---------------------------------------------------------------------


def _task_queue(args: argparse.Namespace) -> Any:
    """
    The task queue of the global database C{run} put on C{args}.
    """
    import socket

    from anvil.worker.queue import TaskQueue

    return TaskQueue(args.global_db, args.reactor, owner=f"{PROG}@{socket.gethostname()}/{os.getpid()}")


def _task_columns() -> list[tuple[str, Callable[[Mapping[str, Any]], object]]]:
    return [
        ("ID", lambda t: t["id"]),
        ("KIND", lambda t: t["kind"]),
        ("STATE", lambda t: t["state"]),
        ("ATTEMPTS", lambda t: f"{t['attempts']}/{t['max_attempts']}"),
        ("REGION", lambda t: t["region"] or "-"),
        ("RUN AFTER", lambda t: _human_time(t["run_after"])),
        ("LAST ERROR", lambda t: (t["last_error"] or "-")[:60]),
    ]


def _show_task(task: Any, out: _Output, message: str | None = None) -> None:
    if out.as_json:
        out.json(task.to_json())
        return
    if message:
        out.line(message)
        return
    record = task.to_json()
    for name in record:
        value = getattr(task, name)
        if isinstance(value, datetime):
            value = _human_time(value)
        elif name == "payload":
            value = json.dumps(value, sort_keys=True)
        elif value is None:
            value = "-"
        out.line(f"{name + ':':<18}{value}")


async def _task_list(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    tasks = await _task_queue(args).list(state=args.state, kind=args.kind, limit=args.limit)
    if out.as_json:
        out.json([t.to_json() for t in tasks])
        return
    out.table([vars(t) for t in tasks], _task_columns())


async def _task_show(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    _show_task(await _task_queue(args).get(args.id), out)


async def _task_retry(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    task = await _task_queue(args).retry(args.id)
    _show_task(task, out, f"Task {task.id} ({task.kind}) is pending again and will run now.")


async def _task_cancel(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    task = await _task_queue(args).cancel(args.id)
    _show_task(task, out, f"Task {task.id} ({task.kind}) is cancelled.")


async def _worker_run_once(store: GlobalStore, args: argparse.Namespace, out: _Output) -> None:
    """
    Run one pass of a worker with this node's configuration, storage and
    databases (the node may be running: passes are safe to overlap).  The
    worker is built by L{anvil.worker.tasks.REGISTRY} from the same context
    as the node's loop, so the pass is the daemon's; only pacing is off
    (a paced scrub would take its whole interval).
    """
    from anvil.cluster.membership import load_or_create_node_id
    from anvil.metrics import Metrics
    from anvil.s3.service import build_s3
    from anvil.storage.cpu import CpuPool
    from anvil.worker.tasks import REGISTRY, WorkerContext

    config, metadata, reactor = args.config_obj, args.metadata, args.reactor
    cpu = CpuPool(reactor, name="anvil-admin-cpu")
    io = CpuPool(reactor, max_threads=4, name="anvil-admin-io")
    cpu.startService()
    io.startService()
    try:
        node_id = load_or_create_node_id(config.node.data_dir)
        metrics = Metrics()
        s3 = build_s3(
            config,
            reactor,
            global_store=metadata.global_store,
            global_db=metadata.global_db,
            regional_db=metadata.regional_db,
            metrics=metrics,
            cpu=cpu,
            io=io,
            node_id=node_id,
        )
        ctx = WorkerContext(
            config=config,
            clock=reactor,
            node_id=node_id,
            metrics=metrics,
            io=io,
            global_db=metadata.global_db,
            s3=s3,
            paced=False,
        )
        summary = await REGISTRY.run_once(args.worker, ctx)
    finally:
        await cpu.stopService()
        await io.stopService()
    if out.as_json:
        out.json({"worker": args.worker, **summary})
        return
    note = summary.pop("note", None)
    out.line(f"{args.worker}: " + ", ".join(f"{k.replace('_', ' ')} {_summary_value(v)}" for k, v in summary.items()))
    if note:
        out.line(f"{args.worker}: {note}")


def _summary_value(value: object) -> str:
    """
    A summary value for the human-readable line.
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


# -- the parser -------------------------------------------------------------


def _common_options(defaults: bool) -> _Parser:
    """
    The global options.  The top-level parser has real defaults; the copies
    on each command default to C{SUPPRESS}, so that an option given before
    the command is not reset by the command's parser, and either position
    works.
    """
    common = _Parser(add_help=False)
    default: Any = None if defaults else argparse.SUPPRESS
    common.add_argument(
        "--config", metavar="FILE", default=default, help="the node's TOML configuration file"
    )
    common.add_argument(
        "--data-dir",
        metavar="DIR",
        default=default,
        help="use the embedded PostgreSQL of this data directory (overrides ANVIL_DATA_DIR)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="print JSON for scripts",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """
    The C{anvil-admin} argument parser.
    """
    common = _common_options(defaults=False)
    parser = _Parser(
        prog=PROG,
        description="Manage an Anvil cluster's regions, tenants, apps, policies and buckets.",
        parents=[_common_options(defaults=True)],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def group(name: str, help: str) -> Any:
        sub = commands.add_parser(name, help=help, parents=[common])
        return sub.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    def leaf(parent: Any, name: str, help: str, handler: _Handler | None) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    migrate = commands.add_parser(
        "migrate",
        help="apply pending schema migrations to the global and regional databases",
        parents=[common],
    )
    migrate.set_defaults(handler=None)

    regions = group("region", "manage regions")
    leaf(regions, "create", "create a region (no error if it exists)", _region_create).add_argument("name", metavar="NAME")
    leaf(regions, "list", "list regions", _region_list)

    tenants = group("tenant", "manage tenants")
    leaf(tenants, "create", "create a tenant", _tenant_create).add_argument("name", metavar="NAME")
    leaf(tenants, "list", "list tenants", _tenant_list)

    apps = group("app", "manage apps (S3 credentials)")
    sub = leaf(apps, "create", "create an app and print its credentials once", _app_create)
    sub.add_argument("--tenant-name", required=True, metavar="T")
    sub.add_argument("--app-name", required=True, metavar="A")
    leaf(apps, "list", "list apps", _app_list).add_argument("--tenant-name", metavar="T")
    leaf(apps, "delete", "delete an app and its policies", _app_delete).add_argument(
        "--app-name", required=True, metavar="A"
    )
    leaf(apps, "rotate-secret", "give an app a new secret and print it once", _app_rotate_secret).add_argument(
        "--app-name", required=True, metavar="A"
    )

    policies = group("policy", "manage what apps may do")
    actions = ", ".join(sorted(ACTIONS))
    for name, help, handler in (
        ("grant", "allow an app an action on a resource", _policy_grant),
        ("revoke", "remove a policy from an app", _policy_revoke),
    ):
        sub = leaf(policies, name, help, handler)
        sub.add_argument("--app-name", required=True, metavar="A")
        sub.add_argument("--action", required=True, metavar="ACTION", help=f"one of {actions}")
        sub.add_argument(
            "--resource",
            required=True,
            metavar="RESOURCE",
            help="'*', 'BUCKET', 'BUCKET/*' or 'BUCKET/PREFIX*'",
        )
    leaf(policies, "list", "list policies", _policy_list).add_argument("--app-name", metavar="A")

    buckets = group("bucket", "inspect buckets and set public access")
    leaf(buckets, "list", "list buckets", _bucket_list).add_argument("--tenant-name", metavar="T")
    sub = leaf(
        buckets,
        "set-public-access",
        "allow or deny anonymous GetObject and HeadObject on a bucket",
        _bucket_set_public_access,
    )
    sub.add_argument("--bucket", required=True, metavar="B", help="the bucket's name")
    access = sub.add_mutually_exclusive_group(required=True)
    access.add_argument(
        "--allow", dest="public", action="store_const", const=True, help="allow anonymous reads"
    )
    access.add_argument(
        "--deny", dest="public", action="store_const", const=False, help="deny anonymous access"
    )

    from anvil.worker.queue import STATES

    task_ids = {"type": _task_id, "metavar": "ID", "help": "the task's id"}
    tasks = group("task", "inspect the task queue; retry or cancel tasks")
    sub = leaf(tasks, "list", "list tasks, oldest first", _task_list)
    sub.add_argument("--state", choices=STATES, help="only tasks in this state")
    sub.add_argument("--kind", metavar="K", help="only tasks of this kind")
    sub.add_argument("--limit", type=int, default=100, metavar="N", help="at most N tasks (default 100)")
    leaf(tasks, "show", "show one task", _task_show).add_argument("id", **task_ids)
    leaf(tasks, "retry", "run a failed or cancelled task again, with all its attempts", _task_retry).add_argument(
        "id", **task_ids
    )
    leaf(tasks, "cancel", "cancel a task that has not finished", _task_cancel).add_argument("id", **task_ids)

    workers = group("worker", "run a node's background workers by hand")
    sub = leaf(workers, "run-once", "run one pass of a worker for this node and print what it did", _worker_run_once)
    from anvil.worker.tasks import REGISTRY as WORKER_REGISTRY

    sub.add_argument("worker", choices=WORKER_REGISTRY.command_names(), help="the worker")

    from anvil.scripts.cluster_admin import add_cluster_commands

    add_cluster_commands(group("cluster", "cluster members, the cluster CA, removing members"), leaf)
    return parser


def _task_id(text: str) -> int:
    """
    Parse a task id (a positive integer) for argparse.
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid task id {text!r}")
    return value


# -- running -------------------------------------------------------------------


def _error_line(message: str) -> str:
    return f"{PROG}: error: {' '.join(message.split())}\n"


async def run(
    reactor: Any,
    argv: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
    environ: Mapping[str, str],
) -> int:
    """
    Run one C{anvil-admin} command.

    @param argv: the arguments, without the program name.
    @return: the exit status: 0 on success, 2 for errors an operator can
        fix (printed as one line on C{stderr}), 1 for unexpected ones.
    """
    # Imported here so that argument errors and --help never pay for (or
    # fail on) the database stack.
    from anvil.meta.connect import open_metadata

    try:
        args = build_parser().parse_args(list(argv))
    except UsageError as e:
        stderr.write(_error_line(str(e)))
        return EXIT_ERROR
    out = _Output(stdout, args.json)
    metadata = None
    try:
        overrides = {"node.data_dir": args.data_dir} if args.data_dir else {}
        config = load_config(overrides, environ, args.config)
        metadata = await open_metadata(config, reactor)
        if args.handler is None:
            applied = metadata.migrations_applied
            if out.as_json:
                out.json(applied)
            else:
                for role in ("global", "regional"):
                    names = applied.get(role, [])
                    if names:
                        out.line(f"Applied {role} migrations: {', '.join(names)}.")
                    else:
                        out.line(f"The {role} database is up to date.")
        else:
            # The task commands work on the queue, not the store.
            args.global_db, args.reactor = metadata.global_db, reactor
            args.config_obj, args.metadata = config, metadata
            await args.handler(metadata.global_store, args, out)
    except (AnvilError, ConfigError) as e:
        stderr.write(_error_line(str(e)))
        return EXIT_ERROR
    except Exception as e:
        stderr.write(_error_line(f"unexpected {type(e).__name__}: {e}"))
        return EXIT_INTERNAL
    finally:
        if metadata is not None:
            try:
                # Stops the embedded PostgreSQL only if this command started
                # it; a running node's server is left alone.
                await metadata.close(stop_embedded=True)
            except Exception as e:
                stderr.write(_error_line(f"could not stop the embedded PostgreSQL: {e}"))
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    The C{anvil-admin} console script.
    """
    from twisted.internet.task import react

    arguments = list(sys.argv[1:] if argv is None else argv)

    async def _main(reactor: Any) -> None:
        status = await run(reactor, arguments, sys.stdout, sys.stderr, os.environ)
        if status:
            raise SystemExit(status)

    react(_main)


if __name__ == "__main__":
    main()
