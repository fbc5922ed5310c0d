# -*- test-case-name: tests.test_config -*-
"""
A node's configuration: schema, sources, validation.

Values come from, in increasing precedence: the defaults below, a TOML file
(C{--config}), environment variables, and C{twistd anvil} options.  Every key
is declared once, in the section dataclasses of this module, with its
default, its environment variable, its command-line option and its
documentation; the option table of C{twistd anvil --help} and
C{etc/anvil.toml.sample} are both generated from that declaration, so they
cannot drift from what the code reads.

Only this module turns strings into typed values.  Anything wrong stops
start-up with a L{ConfigError}: one sentence naming the key and the problem.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import psycopg2.extensions

__all__ = [
    "ConfigError",
    "NodeConfig",
    "Key",
    "KEYS",
    "load_config",
    "render_sample",
]


class ConfigError(Exception):
    """
    The configuration is invalid; the message is one sentence naming the key.
    """


def _key(env: str, option: str | None, doc: str, metavar: str = "") -> dict[str, Any]:
    """
    Field metadata for one configuration key.

    @param env: the environment variable that sets it.
    @param option: the C{twistd anvil} long option (without dashes), or
        C{None} for keys only settable in the file and environment.
    @param doc: one or two sentences for the sample file and C{--help}.
    """
    return {"env": env, "option": option, "doc": doc, "metavar": metavar}


@dataclass(frozen=True)
class NodeSection:
    """
    C{[node]}: identity and housekeeping of this process.
    """

    data_dir: str = field(
        default="anvil-data",
        metadata=_key(
            "ANVIL_DATA_DIR",
            "data-dir",
            "Directory for the node's state: node id, credentials, the "
            "embedded PostgreSQL and, unless storage.dirs says otherwise, "
            "shards. Relative paths are taken from the working directory.",
            "DIR",
        ),
    )
    region: str = field(
        default="us-east-1",
        metadata=_key(
            "REGION",
            "region",
            "The region this node serves; buckets of other regions are "
            "served by their own region's nodes.",
            "NAME",
        ),
    )
    shutdown_timeout: float = field(
        default=15.0,
        metadata=_key(
            "ANVIL_SHUTDOWN_TIMEOUT",
            "shutdown-timeout",
            "Seconds in-flight requests get to finish after SIGTERM before "
            "their connections are closed.",
            "SECONDS",
        ),
    )
    log_format: str = field(
        default="text",
        metadata=_key(
            "ANVIL_LOG_FORMAT",
            "log-format",
            "'text' for human-readable lines, 'json' for one JSON object per "
            "line (journald, log shippers).",
            "FORMAT",
        ),
    )


@dataclass(frozen=True)
class ApiSection:
    """
    C{[api]}: the S3 listener, which also serves C{/}, C{/ready}, C{/metrics}.
    """

    listen: str = field(
        default="tcp:50051",
        metadata=_key(
            "API_LISTEN_ADDR",
            "api-listen",
            "Twisted endpoint string of the S3 API listener, e.g. "
            "'tcp:50051:interface=0.0.0.0' or 'ssl:443:privateKey=key.pem:"
            "certKey=cert.pem'.",
            "ENDPOINT",
        ),
    )
    public_addr: str = field(
        default="",
        metadata=_key(
            "PUBLIC_API_ADDR",
            "public-api-addr",
            "The URL clients and peers use to reach this node's API; empty "
            "means http://127.0.0.1:<listen port>.",
            "URL",
        ),
    )


@dataclass(frozen=True)
class ClusterSection:
    """
    C{[cluster]}: membership and peer traffic over mutual TLS.
    """

    listen: str = field(
        default="tcp:7443",
        metadata=_key(
            "CLUSTER_LISTEN_ADDR",
            "cluster-listen",
            "Twisted endpoint string of the cluster listener (wrapped in "
            "mutual TLS by the node).",
            "ENDPOINT",
        ),
    )
    public_addrs: tuple[str, ...] = field(
        default=(),
        metadata=_key(
            "PUBLIC_CLUSTER_ADDRS",
            "public-cluster-addrs",
            "Comma-separated host:port addresses peers use to reach the "
            "cluster listener; empty means 127.0.0.1:<listen port>.",
            "ADDRS",
        ),
    )
    bootstrap_addrs: tuple[str, ...] = field(
        default=(),
        metadata=_key(
            "BOOTSTRAP_ADDRS",
            "bootstrap-addrs",
            "Comma-separated host:port cluster addresses of existing members "
            "to join through.",
            "ADDRS",
        ),
    )
    init: bool = field(
        default=False,
        metadata=_key(
            "INIT_CLUSTER",
            "init-cluster",
            "Start a new cluster with this node as its first member.",
        ),
    )
    secret: str = field(
        default="",
        metadata=_key(
            "CLUSTER_SECRET",
            "cluster-secret",
            "Shared secret a node must present to join the cluster; identical "
            "on every node.",
            "SECRET",
        ),
    )

    ca_cert_file: str = field(
        default="",
        metadata=_key(
            "ANVIL_CLUSTER_CA_CERT",
            "cluster-ca-cert",
            "PEM file of an operator-supplied cluster CA certificate; empty "
            "means the CA kept (encrypted) in the global database, created by "
            "the node started with INIT_CLUSTER.",
            "PATH",
        ),
    )
    ca_key_file: str = field(
        default="",
        metadata=_key(
            "ANVIL_CLUSTER_CA_KEY",
            "cluster-ca-key",
            "PEM file of the operator CA's private key, so the node can issue "
            "and renew its own certificate; leave empty when node_cert_file "
            "and node_key_file are given instead.",
            "PATH",
        ),
    )
    node_cert_file: str = field(
        default="",
        metadata=_key(
            "ANVIL_CLUSTER_NODE_CERT",
            "cluster-node-cert",
            "PEM file of this node's certificate issued by the operator CA "
            "(anvil-admin cluster ca issue); used with node_key_file.",
            "PATH",
        ),
    )
    node_key_file: str = field(
        default="",
        metadata=_key(
            "ANVIL_CLUSTER_NODE_KEY",
            "cluster-node-key",
            "PEM file of this node's private key, matching node_cert_file.",
            "PATH",
        ),
    )
    protocol_period: float = field(
        default=1.0,
        metadata=_key(
            "ANVIL_GOSSIP_PERIOD",
            None,
            "Seconds between SWIM probes of one random member.",
            "SECONDS",
        ),
    )
    ack_timeout: float = field(
        default=0.5,
        metadata=_key(
            "ANVIL_GOSSIP_ACK_TIMEOUT",
            None,
            "Seconds to wait for a direct ack before asking other members to "
            "probe indirectly; below protocol_period.",
            "SECONDS",
        ),
    )
    indirect_probes: int = field(
        default=3,
        metadata=_key(
            "ANVIL_GOSSIP_INDIRECT_PROBES",
            None,
            "Members asked to probe a silent member indirectly.",
            "COUNT",
        ),
    )
    suspicion_timeout: float = field(
        default=5.0,
        metadata=_key(
            "ANVIL_SUSPICION_TIMEOUT",
            None,
            "Seconds a suspect member has to refute before it is declared dead.",
            "SECONDS",
        ),
    )
    peer_timeout: float = field(
        default=10.0,
        metadata=_key(
            "ANVIL_PEER_TIMEOUT",
            None,
            "Seconds a peer may stay silent during a shard transfer before the "
            "transfer fails and another shard (or node) is used.",
            "SECONDS",
        ),
    )
    write_quorum: int = field(
        default=0,
        metadata=_key(
            "ANVIL_WRITE_QUORUM",
            None,
            "Shards that must be committed for a write to succeed; 0 means k+1.",
            "COUNT",
        ),
    )


@dataclass(frozen=True)
class DatabaseSection:
    """
    C{[database]}: the global and regional PostgreSQL databases.
    """

    global_url: str = field(
        default="",
        metadata=_key(
            "GLOBAL_DATABASE_URL",
            "global-database-url",
            "libpq URL of the global database (tenants, apps, policies, "
            "buckets, tasks). Leave both URLs empty to run an embedded "
            "PostgreSQL in the data directory.",
            "URL",
        ),
    )
    regional_url: str = field(
        default="",
        metadata=_key(
            "REGIONAL_DATABASE_URL",
            "regional-database-url",
            "libpq URL of this region's database (objects, uploads, shard "
            "maps).",
            "URL",
        ),
    )
    connect_timeout: float = field(
        default=5.0,
        metadata=_key(
            "ANVIL_DATABASE_CONNECT_TIMEOUT",
            "database-connect-timeout",
            "Seconds to wait for a database connection.",
            "SECONDS",
        ),
    )
    ready_timeout: float = field(
        default=2.0,
        metadata=_key(
            "ANVIL_DATABASE_READY_TIMEOUT",
            None,
            "Seconds each database gets to answer the /ready probe query.",
            "SECONDS",
        ),
    )
    pool_size: int = field(
        default=8,
        metadata=_key(
            "ANVIL_DATABASE_POOL_SIZE",
            None,
            "Connections this node keeps open to each database.",
            "N",
        ),
    )
    embedded_port: int = field(
        default=0,
        metadata=_key(
            "ANVIL_EMBEDDED_PG_PORT",
            "embedded-pg-port",
            "Also let the embedded PostgreSQL listen on 127.0.0.1 at this "
            "port so other local nodes can share it (password in "
            "<data-dir>/postgres-password); 0 means Unix socket only.",
            "PORT",
        ),
    )
    embedded_user: str = field(
        default="postgres",
        metadata=_key(
            "ANVIL_EMBEDDED_PG_USER",
            None,
            "Unprivileged account that runs the embedded PostgreSQL when the "
            "node runs as root (PostgreSQL refuses to run as root).",
            "USER",
        ),
    )


@dataclass(frozen=True)
class SecretsSection:
    """
    C{[secrets]}: the key that encrypts app secrets and the cluster CA.
    """

    encryption_key: str = field(
        default="",
        metadata=_key(
            "ANVIL_SECRET_ENCRYPTION_KEY",
            None,
            "64 hex characters: the AES-256 key for secrets at rest. Required "
            "with external databases; the embedded default generates one in "
            "<data-dir>/secret.key.",
            "HEX",
        ),
    )
    encryption_key_file: str = field(
        default="",
        metadata=_key(
            "ANVIL_SECRET_ENCRYPTION_KEY_FILE",
            "secret-encryption-key-file",
            "A file (mode 0600) holding the encryption key, instead of "
            "putting it in the environment.",
            "PATH",
        ),
    )


@dataclass(frozen=True)
class StorageSection:
    """
    C{[storage]}: where this node keeps shards.
    """

    dirs: tuple[str, ...] = field(
        default=(),
        metadata=_key(
            "ANVIL_STORAGE_DIRS",
            "storage-dirs",
            "Comma-separated shard directories, one per disk; empty means "
            "the data directory itself (shards go in its shards/ folder).",
            "DIRS",
        ),
    )
    stripe_size: int = field(
        default=1048576,
        metadata=_key(
            "ANVIL_STRIPE_SIZE",
            None,
            "Bytes of object data per erasure-coded stripe.",
            "BYTES",
        ),
    )
    inline_threshold: int = field(
        default=65536,
        metadata=_key(
            "ANVIL_INLINE_THRESHOLD",
            None,
            "Objects (and parts) up to this many bytes are kept inside the "
            "regional database instead of as erasure-coded shards: one "
            "transaction instead of k+m fsynced files. 0 disables it.",
            "BYTES",
        ),
    )


@dataclass(frozen=True)
class ErasureSection:
    """
    C{[erasure]}: the erasure code, identical on every node of a cluster.
    """

    k: int = field(
        default=4,
        metadata=_key(
            "ANVIL_ERASURE_K",
            None,
            "Data shards per stripe: any k shards rebuild the data.",
            "K",
        ),
    )
    m: int = field(
        default=2,
        metadata=_key(
            "ANVIL_ERASURE_M",
            None,
            "Parity shards per stripe: up to m shards may be lost.",
            "M",
        ),
    )


@dataclass(frozen=True)
class WorkerSection:
    """
    C{[worker]}: background maintenance.
    """

    gc_interval: float = field(
        default=60.0,
        metadata=_key(
            "ANVIL_GC_INTERVAL",
            None,
            "Seconds between garbage-collection passes (removing the data of "
            "deleted objects, buckets and aborted uploads).",
            "SECONDS",
        ),
    )
    gc_grace: float = field(
        default=300.0,
        metadata=_key(
            "ANVIL_GC_GRACE",
            None,
            "Seconds deleted data is kept before it is collected; longer than "
            "any upload takes from its last byte to its commit.",
            "SECONDS",
        ),
    )
    stale_upload_age: float = field(
        default=7 * 86400.0,
        metadata=_key(
            "ANVIL_STALE_UPLOAD_AGE",
            None,
            "Seconds after which an unfinished multipart upload is aborted "
            "and its parts collected.",
            "SECONDS",
        ),
    )
    dead_member_repair_after: float = field(
        default=1800.0,
        metadata=_key(
            "ANVIL_DEAD_MEMBER_REPAIR_AFTER",
            None,
            "Seconds a member may stay dead before it is treated as gone for "
            "good and every shard it held is rebuilt elsewhere (long enough "
            "for a reboot or an upgrade).",
            "SECONDS",
        ),
    )
    scrub_rate: float = field(
        default=20.0,
        metadata=_key(
            "ANVIL_SCRUB_RATE",
            None,
            "MB per second the scrubber may read from this node's shard files.",
            "MB/S",
        ),
    )
    scrub_interval: float = field(
        default=60.0,
        metadata=_key(
            "ANVIL_SCRUB_INTERVAL",
            None,
            "Seconds between scrub passes; a pass resumes where the last one "
            "stopped and reads at most scrub_rate times this many MB.",
            "SECONDS",
        ),
    )
    sweep_interval: float = field(
        default=300.0,
        metadata=_key(
            "ANVIL_SWEEP_INTERVAL",
            None,
            "Seconds between sweeps comparing shard maps with membership and "
            "with the shard files peers report.",
            "SECONDS",
        ),
    )
    task_poll_interval: float = field(
        default=10.0,
        metadata=_key(
            "ANVIL_TASK_POLL_INTERVAL",
            None,
            "Seconds between task-queue polls (NOTIFY wakes workers at once "
            "in between).",
            "SECONDS",
        ),
    )
    task_max_attempts: int = field(
        default=8,
        metadata=_key(
            "ANVIL_TASK_MAX_ATTEMPTS",
            None,
            "Attempts before a task is parked as failed.",
            "COUNT",
        ),
    )
    rebalance_rate: float = field(
        default=50.0,
        metadata=_key(
            "ANVIL_REBALANCE_RATE",
            None,
            "MB per second rebalancing may move, so client traffic keeps "
            "priority.",
            "MB/S",
        ),
    )


@dataclass(frozen=True)
class NodeConfig:
    """
    A node's validated configuration.
    """

    node: NodeSection = field(default_factory=NodeSection)
    api: ApiSection = field(default_factory=ApiSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    secrets: SecretsSection = field(default_factory=SecretsSection)
    storage: StorageSection = field(default_factory=StorageSection)
    erasure: ErasureSection = field(default_factory=ErasureSection)
    worker: WorkerSection = field(default_factory=WorkerSection)

    @property
    def embedded(self) -> bool:
        """
        Whether this node runs the embedded PostgreSQL (no URLs configured).
        """
        return not self.database.global_url and not self.database.regional_url

    @property
    def storage_dirs(self) -> tuple[str, ...]:
        """
        The shard directories, defaulting to the data directory (the shard
        store keeps its files in a C{shards/} folder of each).
        """
        return self.storage.dirs or (self.node.data_dir,)


@dataclass(frozen=True)
class Key:
    """
    One configuration key, as declared by a section field.

    @ivar name: C{section.key}.
    """

    section: str
    name: str
    type: Any
    default: Any
    env: str
    option: str | None
    doc: str
    metavar: str

    @property
    def dotted(self) -> str:
        """
        The key's C{section.name} spelling, used in messages and overrides.
        """
        return f"{self.section}.{self.name}"


def _keys() -> list[Key]:
    keys = []
    for section in dataclasses.fields(NodeConfig):
        section_type = section.default_factory  # type: ignore[misc]
        for f in dataclasses.fields(section_type):
            keys.append(
                Key(
                    section.name,
                    f.name,
                    f.type,
                    f.default,
                    f.metadata["env"],
                    f.metadata["option"],
                    f.metadata["doc"],
                    f.metadata["metavar"],
                )
            )
    return keys


#: Every configuration key, in declaration order.
KEYS: list[Key] = _keys()

_BY_DOTTED = {k.dotted: k for k in KEYS}


# -- parsing ---------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _from_string(key: Key, raw: str, source: str) -> Any:
    """
    Parse an environment or command-line string for C{key}.
    """
    kind = key.type
    try:
        if kind == "bool":
            value = raw.strip().lower()
            if value in _TRUE:
                return True
            if value in _FALSE:
                return False
            raise ValueError
        if kind == "int":
            return int(raw.strip())
        if kind == "float":
            return float(raw.strip())
        if kind == "tuple[str, ...]":
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return raw
    except ValueError:
        raise ConfigError(
            f"{key.dotted} ({source}) must be {_describe(kind)}, not {raw!r}."
        ) from None


def _from_toml(key: Key, value: Any, source: str) -> Any:
    """
    Check and convert a value read from the TOML file for C{key}.
    """
    kind = key.type
    ok: bool
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "tuple[str, ...]":
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(
            f"{key.dotted} ({source}) must be {_describe(kind)}, not {value!r}."
        )
    return value


def _describe(kind: str) -> str:
    return {
        "bool": "true or false",
        "int": "an integer",
        "float": "a number",
        "tuple[str, ...]": "a list of strings (comma-separated)",
    }.get(kind, "a string")


def _read_toml(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"The configuration file {path} does not exist.") from None
    except OSError as e:
        raise ConfigError(
            f"The configuration file {path} cannot be read: {e.strerror}."
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"The configuration file {path} is not valid TOML: {e}.") from None
    sections = {f.name for f in dataclasses.fields(NodeConfig)}
    for name, body in document.items():
        if name not in sections:
            raise ConfigError(
                f"{path}: unknown section [{name}] (known sections: "
                f"{', '.join(sorted(sections))})."
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {name} must be a [{name}] table.")
        for key in body:
            if f"{name}.{key}" not in _BY_DOTTED:
                known = ", ".join(k.name for k in KEYS if k.section == name)
                raise ConfigError(
                    f"{path}: unknown key {name}.{key} (known keys in "
                    f"[{name}]: {known})."
                )
    return document


def load_config(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
    cwd: str | None = None,
) -> NodeConfig:
    """
    Build and validate a node's configuration from all its sources.

    @param overrides: values from command-line options keyed by
        C{section.key}; a value that is a string is parsed like an
        environment variable, anything else is taken as it is. C{None}
        values are ignored (the option was not given).
    @param environ: the environment (default: none at all, so tests are
        hermetic; the node and CLI pass C{os.environ}).
    @param config_path: the TOML file, if any.
    @param cwd: the directory relative paths are taken from.
    @raise ConfigError: naming the first invalid key.
    """
    environ = environ or {}
    values: dict[str, Any] = {}
    if config_path:
        for section, body in _read_toml(config_path).items():
            for name, value in body.items():
                key = _BY_DOTTED[f"{section}.{name}"]
                values[key.dotted] = _from_toml(key, value, config_path)
    for key in KEYS:
        if key.env in environ:
            values[key.dotted] = _from_string(
                key, environ[key.env], f"environment variable {key.env}"
            )
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        key = _BY_DOTTED.get(dotted)
        if key is None:
            raise ConfigError(f"Unknown configuration key {dotted}.")
        source = f"option --{key.option}" if key.option else dotted
        if isinstance(value, str):
            values[dotted] = _from_string(key, value, source)
        else:
            values[dotted] = value

    base = cwd or os.getcwd()
    # Relative paths are resolved now, once: twistd may chdir later.
    data_dir = values.get("node.data_dir", _BY_DOTTED["node.data_dir"].default)
    values["node.data_dir"] = os.path.normpath(os.path.join(base, data_dir))
    if "storage.dirs" in values:
        values["storage.dirs"] = tuple(
            os.path.normpath(os.path.join(base, d)) for d in values["storage.dirs"]
        )

    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        section, name = dotted.split(".", 1)
        sections.setdefault(section, {})[name] = value
    built = {}
    for section_field in dataclasses.fields(NodeConfig):
        section_type = section_field.default_factory  # type: ignore[misc]
        built[section_field.name] = section_type(**sections.get(section_field.name, {}))
    config = NodeConfig(**built)
    for check in _CHECKS:
        check(config)
    return config


# -- validation ------------------------------------------------------------

_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def _check_node(config: NodeConfig) -> None:
    if not _REGION.match(config.node.region):
        raise ConfigError(
            f"node.region {config.node.region!r} is not a valid region name "
            "(lower-case letters, digits and '-', at most 63 characters)."
        )
    if config.node.shutdown_timeout < 0:
        raise ConfigError("node.shutdown_timeout must not be negative.")
    if config.node.log_format not in ("text", "json"):
        raise ConfigError(
            f"node.log_format must be 'text' or 'json', not "
            f"{config.node.log_format!r}."
        )


def _check_endpoints(config: NodeConfig) -> None:
    for dotted, value in (
        ("api.listen", config.api.listen),
        ("cluster.listen", config.cluster.listen),
    ):
        problem = endpoint_problem(value)
        if problem:
            raise ConfigError(
                f"{dotted} {value!r} is not a valid listen endpoint: {problem}."
            )
    if config.api.public_addr and not re.match(
        r"^https?://[^/\s]+/?$", config.api.public_addr
    ):
        raise ConfigError(
            f"api.public_addr {config.api.public_addr!r} must be a URL like "
            "http://host:port."
        )
    for dotted, addrs in (
        ("cluster.public_addrs", config.cluster.public_addrs),
        ("cluster.bootstrap_addrs", config.cluster.bootstrap_addrs),
    ):
        for addr in addrs:
            match = _HOST_PORT.match(addr)
            if not match or not 0 < int(match.group(2)) < 65536:
                raise ConfigError(
                    f"{dotted} entry {addr!r} must be host:port."
                )


def endpoint_problem(description: str) -> str | None:
    """
    Why C{description} is not a usable server endpoint string, or C{None}.

    Twisted's own parser does the work (it also loads the certificate files
    of C{ssl:} endpoints); nothing listens.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint = serverFromString(_NoReactor(), description)
    except Exception as e:  # the parser raises many types; all mean "bad"
        return str(e) or type(e).__name__
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"port {port} is out of range"
    return None


class _NoReactor:
    """
    Stands in for the reactor while an endpoint string is only parsed.
    """


def _check_database(config: NodeConfig) -> None:
    db = config.database
    if bool(db.global_url) != bool(db.regional_url):
        missing = "regional_url" if db.global_url else "global_url"
        raise ConfigError(
            f"database.{missing} is empty: configure both database URLs, or "
            "neither to use the embedded PostgreSQL."
        )
    for dotted, url in (
        ("database.global_url", db.global_url),
        ("database.regional_url", db.regional_url),
    ):
        if url:
            try:
                psycopg2.extensions.parse_dsn(url)
            except psycopg2.ProgrammingError as e:
                raise ConfigError(
                    f"{dotted} is not a valid libpq URL: "
                    f"{str(e).strip().splitlines()[0]}."
                ) from None
    if db.connect_timeout <= 0 or db.ready_timeout <= 0:
        raise ConfigError("database.connect_timeout and ready_timeout must be positive.")
    if db.pool_size < 1:
        raise ConfigError("database.pool_size must be at least 1.")
    if not 0 <= db.embedded_port <= 65535:
        raise ConfigError(
            f"database.embedded_port {db.embedded_port} is not a TCP port (0-65535)."
        )


def _check_secrets(config: NodeConfig) -> None:
    key = config.secrets.encryption_key
    if key and not _HEX64.match(key):
        raise ConfigError(
            "secrets.encryption_key (ANVIL_SECRET_ENCRYPTION_KEY) must be 64 "
            f"hex characters (a 256-bit key), not {len(key)} characters"
            + (" of hex." if re.fullmatch("[0-9a-fA-F]*", key) else " including non-hex ones.")
        )
    if key and config.secrets.encryption_key_file:
        raise ConfigError(
            "secrets.encryption_key and secrets.encryption_key_file are both "
            "set: use one."
        )
    if not config.embedded and not (key or config.secrets.encryption_key_file):
        raise ConfigError(
            "secrets.encryption_key (ANVIL_SECRET_ENCRYPTION_KEY) is required "
            "when database URLs are configured: every node of the cluster "
            "needs the same 64-hex-character key."
        )


def _check_storage(config: NodeConfig) -> None:
    k, m = config.erasure.k, config.erasure.m
    if k < 1 or m < 0 or k + m > 256:
        raise ConfigError(
            f"erasure.k={k} and erasure.m={m} are invalid: k must be at least "
            "1, m at least 0, and k + m at most 256."
        )
    if not 0 <= config.storage.inline_threshold <= 1024 * 1024:
        raise ConfigError(
            "storage.inline_threshold must be between 0 and 1048576 bytes."
        )
    stripe = config.storage.stripe_size
    if stripe < 4096 or stripe > 64 * 1024 * 1024 or stripe % k:
        raise ConfigError(
            f"storage.stripe_size {stripe} must be between 4 KiB and 64 MiB "
            f"and a multiple of erasure.k ({k})."
        )


def _check_worker(config: NodeConfig) -> None:
    worker = config.worker
    if worker.gc_interval <= 0 or worker.gc_grace < 0 or worker.stale_upload_age <= 0:
        raise ConfigError(
            "worker.gc_interval and worker.stale_upload_age must be positive and "
            "worker.gc_grace must not be negative."
        )


def _check_maintenance(config: NodeConfig) -> None:
    worker = config.worker
    for name in ("dead_member_repair_after", "scrub_rate", "scrub_interval",
                 "sweep_interval", "task_poll_interval", "rebalance_rate"):
        if getattr(worker, name) <= 0:
            raise ConfigError(f"worker.{name} must be positive.")
    if worker.task_max_attempts < 1:
        raise ConfigError("worker.task_max_attempts must be at least 1.")


def _check_cluster(config: NodeConfig) -> None:
    cluster = config.cluster
    if not 0 < cluster.ack_timeout < cluster.protocol_period:
        raise ConfigError(
            "cluster.ack_timeout must be positive and below cluster.protocol_period."
        )
    if cluster.suspicion_timeout <= 0 or cluster.peer_timeout <= 0:
        raise ConfigError("cluster.suspicion_timeout and cluster.peer_timeout must be positive.")
    if cluster.indirect_probes < 0:
        raise ConfigError("cluster.indirect_probes must not be negative.")
    total = config.erasure.k + config.erasure.m
    if not (cluster.write_quorum == 0 or config.erasure.k <= cluster.write_quorum <= total):
        raise ConfigError(
            f"cluster.write_quorum {cluster.write_quorum} must be 0 (k+1) or "
            f"between erasure.k ({config.erasure.k}) and k+m ({total})."
        )
    if bool(cluster.node_cert_file) != bool(cluster.node_key_file):
        raise ConfigError("cluster.node_cert_file and cluster.node_key_file go together.")
    if (cluster.ca_key_file or cluster.node_cert_file) and not cluster.ca_cert_file:
        raise ConfigError(
            "cluster.ca_cert_file is required with cluster.ca_key_file or cluster.node_cert_file."
        )
    if cluster.ca_cert_file and not (cluster.ca_key_file or cluster.node_cert_file):
        raise ConfigError(
            "cluster.ca_cert_file needs cluster.ca_key_file, or cluster.node_cert_file "
            "and cluster.node_key_file."
        )


def _check_writable(config: NodeConfig) -> None:
    for dotted, path in [("node.data_dir", config.node.data_dir)] + [
        ("storage.dirs", d) for d in config.storage.dirs
    ]:
        problem = _directory_problem(path)
        if problem:
            raise ConfigError(f"{dotted} {path} is not usable: {problem}.")


def _directory_problem(path: str) -> str | None:
    """
    Create C{path} if needed and prove we can write in it.
    """
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".anvil-write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def _check_key_file(config: NodeConfig) -> None:
    path = config.secrets.encryption_key_file
    if not path:
        return
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError as e:
        raise ConfigError(
            f"secrets.encryption_key_file {path} cannot be read: {e.strerror}."
        ) from None
    if not _HEX64.match(key):
        raise ConfigError(
            f"secrets.encryption_key_file {path} must hold 64 hex characters."
        )


_CHECKS: list[Callable[[NodeConfig], None]] = [
    _check_node,
    _check_endpoints,
    _check_database,
    _check_secrets,
    _check_key_file,
    _check_storage,
    _check_worker,
    _check_maintenance,
    _check_cluster,
    _check_writable,
]


def encryption_key(config: NodeConfig) -> str:
    """
    The configured encryption key (from the value or its file), or C{""}
    when the embedded default should generate one.
    """
    if config.secrets.encryption_key:
        return config.secrets.encryption_key
    if config.secrets.encryption_key_file:
        with open(config.secrets.encryption_key_file) as f:
            return f.read().strip()
    return ""


# -- documentation -----------------------------------------------------------

def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wrap(text: str, width: int = 76) -> Iterator[str]:
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            yield line
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        yield line


def render_sample() -> str:
    """
    The text of C{etc/anvil.toml.sample}: every key, commented out, with its
    default, its documentation, and its environment variable and option.
    """
    out = [
        "# Anvil node configuration (TOML).",
        "#",
        "# Every key is shown commented out with its default. Precedence, lowest",
        "# first: defaults, this file (twistd anvil --config FILE), environment",
        "# variables, twistd anvil options.",
        "#",
        "# Generated from anvil/config.py (python -m anvil.config > "
        "etc/anvil.toml.sample).",
    ]
    section = None
    for key in KEYS:
        if key.section != section:
            section = key.section
            out += ["", f"[{section}]"]
        out.append("")
        out += [f"# {line}" for line in _wrap(key.doc)]
        where = f"Environment: {key.env}."
        if key.option:
            where += f" Option: --{key.option}."
        out.append(f"# {where}")
        out.append(f"# {key.name} = {_toml_literal(key.default)}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_sample())
