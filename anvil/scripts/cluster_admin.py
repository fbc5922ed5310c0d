# -*- test-case-name: tests.test_cluster_admin -*-
"""
C{anvil-admin cluster ...}: the cluster as a node sees it, the cluster CA,
and removing members for good.

Run with a node's environment (its data dir and database settings), the
commands talk to that node's cluster listener over mutual TLS with the
node's own key and certificate, so they need no credentials of their own
beyond read access to the data dir:

  - C{cluster status [--json]}: the members the node sees;
  - C{cluster remove NODE_ID}: declare a member gone for good: the node marks
    it I{left} and gossips it, the global database records it in
    C{removed_nodes}, and an C{evacuate} task is queued so that its shards
    are rebuilt elsewhere at once;
  - C{cluster ca export [--out FILE]}: the CA certificate (PEM);
  - C{cluster ca issue NODE_ID --cert-out F --key-out F}: a node key and
    certificate from the operator CA files or the CA kept in the database,
    for operators who run their own PKI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from anvil.cluster.ca import NODE_CERT_LIFETIME, CAStore, ClusterCA, check_node_id
from anvil.cluster.tls import ClusterTLSPolicy, NodeIdentity
from anvil.errors import AnvilError, InvalidArgument

#: Seconds to wait for the node's cluster listener.
REQUEST_TIMEOUT = 15.0


class ClusterAdminError(AnvilError):
    """
    A cluster command cannot do what it was asked (one-line message).
    """


def add_cluster_commands(commands: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    """
    Add the C{cluster} subcommands to C{anvil-admin}'s parser.

    @param commands: the subparsers of the C{cluster} group.
    @param leaf: C{anvil-admin}'s C{leaf(parent, name, help, handler)}.
    """
    leaf(commands, "status", "show the cluster members as this node sees them", _status)
    sub = leaf(
        commands,
        "remove",
        "declare a member gone for good: mark it left, record it and start rebuilding its shards",
        _remove,
    )
    sub.add_argument("node_id", metavar="NODE_ID", help="the member's node id")
    ca = leaf(commands, "ca", "the cluster CA: export its certificate, issue node certificates", None)
    ca_commands = ca.add_subparsers(dest="ca_command", metavar="SUBCOMMAND", required=True)
    sub = leaf(ca_commands, "export", "print (or write) the cluster CA certificate", _ca_export)
    sub.add_argument("--out", metavar="FILE", help="write the PEM to FILE instead of printing it")
    sub = leaf(
        ca_commands,
        "issue",
        "issue a node key and certificate signed by the cluster CA (for operator-run PKI)",
        _ca_issue,
    )
    sub.add_argument("node_id", metavar="NODE_ID", help="the node's id (its data dir's node_id file)")
    sub.add_argument("--cert-out", required=True, metavar="FILE", help="where to write the certificate")
    sub.add_argument("--key-out", required=True, metavar="FILE", help="where to write the key (mode 0600)")
    sub.add_argument("--ca-cert", metavar="FILE", help="the operator CA certificate (default: configured or stored CA)")
    sub.add_argument("--ca-key", metavar="FILE", help="the operator CA key")
    sub.add_argument(
        "--days", type=float, default=NODE_CERT_LIFETIME / 86400, metavar="N",
        help=f"validity in days (default {NODE_CERT_LIFETIME / 86400:.0f})",
    )


# -- the CA and the node's identity ---------------------------------------


async def _cluster_ca(args: argparse.Namespace) -> ClusterCA:
    """
    The cluster CA the node uses: the configured operator CA, or the one
    kept in the global database.
    """
    cluster = args.config_obj.cluster
    if cluster.ca_cert_file:
        if cluster.ca_key_file:
            return ClusterCA.from_files(cluster.ca_cert_file, cluster.ca_key_file)
        return ClusterCA.from_certificate_file(cluster.ca_cert_file)
    ca = await CAStore(args.metadata.global_db, args.metadata.secret_box).load()
    if ca is None:
        raise ClusterAdminError(
            "There is no cluster CA in the global database yet: start the first "
            "node with INIT_CLUSTER=true, or configure an operator CA."
        )
    return ca


def _local_node_id(config: Any) -> str:
    """
    The node id kept in the data dir (never created here).
    """
    path = os.path.join(config.node.data_dir, "node_id")
    try:
        with open(path) as f:
            node_id = f.read().strip()
    except FileNotFoundError:
        raise ClusterAdminError(
            f"There is no node id in {config.node.data_dir}: no node has run with this data dir."
        ) from None
    return check_node_id(node_id)


def _identity(config: Any, ca: ClusterCA) -> NodeIdentity:
    """
    The node's identity: its operator-issued files, or those in its data dir.
    """
    cluster = config.cluster
    if cluster.node_cert_file:
        return NodeIdentity.from_files(cluster.node_cert_file, cluster.node_key_file, ca)
    return NodeIdentity.from_data_dir(config.node.data_dir, ca)


def cluster_address(config: Any) -> str:
    """
    Where the node's cluster listener is reached from this machine: the
    first public cluster address, else 127.0.0.1 (or the configured
    interface) and the port of C{cluster.listen}.

    @raise ClusterAdminError: when neither gives a port (C{tcp:0}).
    """
    if config.cluster.public_addrs:
        return str(config.cluster.public_addrs[0])
    parts = config.cluster.listen.split(":")
    port, interface = "", ""
    positional = [p for p in parts[1:] if "=" not in p]
    for part in parts[1:]:
        if part.startswith("port="):
            port = part[5:]
        elif part.startswith("interface="):
            interface = part[10:]
    if not port and positional:
        port = positional[0]
    if parts[0] not in ("tcp", "tcp6", "ssl") or not port.isdigit() or int(port) == 0:
        raise ClusterAdminError(
            f"Cannot tell the cluster listener's address from {config.cluster.listen!r}; "
            "set PUBLIC_CLUSTER_ADDRS."
        )
    host = interface if interface and interface not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"{host}:{port}"


class _NodeClient:
    """
    Requests to the local node's cluster listener under mutual TLS, as the
    node itself.
    """

    def __init__(self, args: argparse.Namespace, ca: ClusterCA) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        config = args.config_obj
        self.reactor = args.reactor
        self.node_id = _local_node_id(config)
        self.addr = cluster_address(config)
        identity = _identity(config, ca)
        node_id = self.node_id
        policy = ClusterTLSPolicy(identity, ca, lambda host, port: node_id)
        self.pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.http = HTTPClient(
            Agent(self.reactor, contextFactory=policy, pool=self.pool, connectTimeout=5)
        )

    async def request(self, method: str, path: str) -> tuple[int, Any]:
        """
        One request; the status and the decoded JSON body (or C{None}).

        @raise ClusterAdminError: when the node does not answer.
        """
        import treq

        url = f"https://{self.addr}/cluster/v1/{path}"
        try:
            d = self.http.request(method, url)
            d.addTimeout(REQUEST_TIMEOUT, self.reactor)
            response = await d
            d = treq.content(response)
            d.addTimeout(REQUEST_TIMEOUT, self.reactor)
            body = await d
        except Exception as e:
            raise ClusterAdminError(
                f"The node's cluster listener at {self.addr} did not answer "
                f"({type(e).__name__}: {e}); is the node running?"
            ) from None
        finally:
            await self.pool.closeCachedConnections()
        try:
            document = json.loads(body) if body else None
        except ValueError:
            document = None
        return response.code, document


# -- commands --------------------------------------------------------------


async def _status(store: Any, args: argparse.Namespace, out: Any) -> None:
    client = _NodeClient(args, await _cluster_ca(args))
    code, document = await client.request("GET", "members")
    if code != 200 or not isinstance(document, dict):
        raise ClusterAdminError(f"The node at {client.addr} answered {code} to a member list request.")
    members = document["members"]
    if out.as_json:
        out.json({"node_id": document["node_id"], "members": members})
        return
    out.line(f"Node {document['node_id']} (region {document.get('region', '-')}) sees {len(members)} members:")
    out.table(
        members,
        [
            ("NODE ID", lambda m: m["node_id"] + (" *" if m["node_id"] == document["node_id"] else "")),
            ("REGION", lambda m: m["region"]),
            ("STATE", lambda m: m["state"]),
            ("API", lambda m: m["api_addr"] or "-"),
            ("CLUSTER", lambda m: m["cluster_addr"] or "-"),
            ("CAPACITY", lambda m: m.get("capacity", 0)),
            ("INCARNATION", lambda m: m.get("incarnation", 0)),
        ],
    )


async def _remove(store: Any, args: argparse.Namespace, out: Any) -> None:
    node_id = check_node_id(args.node_id)
    client = _NodeClient(args, await _cluster_ca(args))
    if node_id == client.node_id:
        raise InvalidArgument("A node cannot remove itself; run this on another node.")
    code, document = await client.request("POST", f"members/{node_id}/remove")
    region = None
    if code == 200 and isinstance(document, dict):
        region = document["removed"].get("region") or None
        marked = True
    elif code == 404:
        # A member dead long enough is forgotten by gossip; its shards still
        # need rebuilding.
        marked = False
    else:
        detail = document.get("error") if isinstance(document, dict) else None
        raise ClusterAdminError(
            f"The node at {client.addr} refused to remove {node_id} (status {code}"
            + (f": {detail}" if detail else "") + ")."
        )
    db = args.metadata.global_db
    rows = await db.run_query(
        "INSERT INTO removed_nodes (node_id) VALUES (%s) ON CONFLICT (node_id) DO NOTHING "
        "RETURNING removed_at",
        (node_id,),
    )
    task_id = None
    if rows:
        from anvil.worker.queue import TaskQueue

        queue = TaskQueue(db, args.reactor, owner=f"anvil-admin@{socket.gethostname()}/{os.getpid()}")
        task_id = await queue.enqueue("evacuate", {"node_id": node_id}, region=region)
    if out.as_json:
        out.json({
            "node_id": node_id,
            "marked_left": marked,
            "newly_recorded": bool(rows),
            "evacuate_task": task_id,
        })
        return
    if marked:
        out.line(f"Node {client.node_id} marked {node_id} as left; the cluster learns it by gossip.")
    else:
        out.line(f"Node {client.node_id} does not know {node_id} (any more); recording the removal anyway.")
    if rows:
        out.line(f"Recorded {node_id} as removed; evacuate task {task_id} rebuilds its shards elsewhere.")
    else:
        out.line(f"{node_id} was already recorded as removed; no new evacuate task (see anvil-admin task list).")


async def _ca_export(store: Any, args: argparse.Namespace, out: Any) -> None:
    pem = (await _cluster_ca(args)).certificate_pem()
    if args.out:
        _write(args.out, pem, 0o644)
        if out.as_json:
            out.json({"file": args.out})
        else:
            out.line(f"Wrote the cluster CA certificate to {args.out}.")
        return
    if out.as_json:
        out.json({"certificate_pem": pem.decode("ascii")})
    else:
        out.line(pem.decode("ascii").rstrip("\n"))


async def _ca_issue(store: Any, args: argparse.Namespace, out: Any) -> None:
    node_id = check_node_id(args.node_id)
    if bool(args.ca_cert) != bool(args.ca_key):
        raise InvalidArgument("--ca-cert and --ca-key go together.")
    if args.days <= 0:
        raise InvalidArgument("--days must be positive.")
    if args.ca_cert:
        ca = ClusterCA.from_files(args.ca_cert, args.ca_key)
    else:
        ca = await _cluster_ca(args)
    if not ca.can_issue:
        raise ClusterAdminError(
            "The configured cluster CA has no key here; pass --ca-cert and --ca-key."
        )
    key = ec.generate_private_key(ec.SECP256R1())
    now = args.reactor.seconds()
    certificate = ca.issue_node_certificate(node_id, key.public_key(), now, args.days * 86400)
    _write(
        args.key_out,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        0o600,
    )
    _write(args.cert_out, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    not_after = certificate.not_valid_after_utc
    if out.as_json:
        out.json({
            "node_id": node_id,
            "cert_file": args.cert_out,
            "key_file": args.key_out,
            "not_after": not_after.isoformat(),
        })
    else:
        out.line(
            f"Issued a certificate for node {node_id}, valid until "
            f"{not_after.astimezone(datetime.UTC):%Y-%m-%d %H:%M:%SZ}: "
            f"{args.cert_out} (key {args.key_out})."
        )


def _write(path: str, data: bytes, mode: int) -> None:
    """
    Write C{data} to C{path}, created with C{mode} (a key is never readable
    by others, not even for an instant).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
    except OSError as e:
        raise ClusterAdminError(f"Cannot write {path}: {e.strerror}.") from None
