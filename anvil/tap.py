# -*- test-case-name: tests.test_tap -*-
"""
What C{twistd anvil} calls: command-line options and C{makeService}.

The options are generated from the configuration schema in
L{anvil.config}, so C{twistd anvil --help} documents every key that has an
option.  The configuration is loaded and validated in C{postOptions}, before
the reactor starts: a bad configuration stops C{twistd} with one sentence
on standard error and exit status 1, never half-starts a node.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import psycopg2
from twisted.application.service import IService
from twisted.python import usage

from anvil import __version__
from anvil.config import KEYS, ConfigError, NodeConfig, load_config
from anvil.meta.embedded import EmbeddedPostgresError, find_server_binaries


def _help(key: Any) -> str:
    default = key.default
    if isinstance(default, tuple):
        default = ",".join(default) or "none"
    env = f"[env {key.env}]"
    return f"{key.doc} {env}" + (f" (default: {default})" if default != "" else "")


class Options(usage.Options):
    """
    C{twistd anvil} options: C{--config FILE} plus one option per
    configuration key that has one.  Options override environment variables,
    which override the file, which overrides the defaults.
    """

    synopsis = "[options]"
    longdesc = (
        "Run an Anvil node: the S3 API, erasure-coded shard storage, cluster "
        "membership and background workers. With no database URLs, the node "
        "runs an embedded PostgreSQL in its data directory and writes "
        "ready-to-use S3 credentials to <data-dir>/credentials.json. See "
        "etc/anvil.toml.sample for every configuration key."
    )

    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/anvil.toml.sample)."]
    ] + [
        [key.option, None, None, _help(key)]
        for key in KEYS
        if key.option and key.type != "bool"
    ]
    optFlags = [
        [key.option, None, _help(key)]
        for key in KEYS
        if key.option and key.type == "bool"
    ]

    #: The validated configuration, set by L{postOptions}.
    config: NodeConfig

    def opt_version(self) -> None:
        """
        Print Anvil's version and exit.
        """
        print(f"Anvil {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        """
        Load and validate the configuration from every source; exit with one
        clear sentence when it is invalid.
        """
        overrides: dict[str, Any] = {}
        for key in KEYS:
            if not key.option:
                continue
            value = self.get(key.option)
            if key.type == "bool":
                # A flag can only switch a key on; absent means "not given".
                value = True if value else None
            overrides[key.dotted] = value
        try:
            self.config = load_config(overrides, os.environ, self["config"])
            preflight(self.config)
        except (ConfigError, EmbeddedPostgresError) as e:
            # One sentence, no usage dump, no traceback (twistd would print
            # the whole --help text for a UsageError).
            sys.stderr.write(f"anvil: configuration error: {e}\n")
            raise SystemExit(1)


def preflight(config: NodeConfig) -> None:
    """
    The cheap start-up checks that need the outside world: the database
    servers answer, or the embedded PostgreSQL's binaries exist.

    They run before the reactor starts, so their failures are reported like
    any other configuration error.

    @raise ConfigError: naming the database URL that cannot be reached.
    @raise EmbeddedPostgresError: when no PostgreSQL server binaries exist.
    """
    if config.embedded:
        find_server_binaries()
        return
    for dotted, url in (
        ("database.global_url (GLOBAL_DATABASE_URL)", config.database.global_url),
        ("database.regional_url (REGIONAL_DATABASE_URL)", config.database.regional_url),
    ):
        try:
            psycopg2.connect(
                url, connect_timeout=max(1, int(config.database.connect_timeout))
            ).close()
        except psycopg2.Error as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"{dotted} cannot be reached: {reason}."
            ) from None


def makeService(options: Options) -> IService:
    """
    Build the node's service tree from the validated configuration.
    """
    from twisted.internet import reactor

    from anvil.node import NodeService

    return NodeService(options.config, reactor)
