# -*- test-case-name: tests.test_config -*-
"""
Tests for L{anvil.config}: sources, precedence, validation, the sample file.
"""

from __future__ import annotations

import os
import tomllib

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from anvil.config import KEYS, ConfigError, load_config, render_sample

_SAMPLE = FilePath(__file__).parent().parent().child("etc").child("anvil.toml.sample")


class ConfigTestMixin:
    """
    Helpers writing TOML files and loading configurations in a temporary
    directory.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.dir)

    def toml(self, text: str) -> str:
        path = os.path.join(self.dir, "anvil.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def load(self, overrides=None, environ=None, path=None):
        environ = dict(environ or {})
        environ.setdefault("ANVIL_DATA_DIR", os.path.join(self.dir, "data"))
        return load_config(overrides, environ, path, cwd=self.dir)

    def error(self, **kwargs) -> str:
        e = self.assertRaises(ConfigError, self.load, **kwargs)  # type: ignore[attr-defined]
        return str(e)


class PrecedenceTests(ConfigTestMixin, SynchronousTestCase):
    """
    Defaults < TOML file < environment < options.
    """

    def test_defaults(self) -> None:
        """
        With no sources, every key has its documented default.
        """
        config = load_config({}, {}, None, cwd=self.dir)
        self.assertEqual(config.node.data_dir, os.path.join(self.dir, "anvil-data"))
        self.assertEqual(config.node.region, "us-east-1")
        self.assertEqual(config.api.listen, "tcp:50051")
        self.assertEqual(config.cluster.listen, "tcp:7443")
        self.assertEqual((config.erasure.k, config.erasure.m), (4, 2))
        self.assertTrue(config.embedded)
        self.assertEqual(config.storage_dirs, (os.path.join(self.dir, "anvil-data"),))

    def test_file_overrides_defaults(self) -> None:
        """
        A TOML file overrides the defaults.
        """
        path = self.toml('[node]\nregion = "eu-west-1"\n[erasure]\nk = 6\nm = 3\n'
                         '[storage]\nstripe_size = 6291456\n')
        config = self.load(path=path)
        self.assertEqual(config.node.region, "eu-west-1")
        self.assertEqual((config.erasure.k, config.erasure.m), (6, 3))

    def test_environment_overrides_file(self) -> None:
        """
        Environment variables override the file.
        """
        path = self.toml('[node]\nregion = "eu-west-1"\n[api]\nlisten = "tcp:1"\n')
        config = self.load(path=path, environ={"REGION": "ap-south-1"})
        self.assertEqual(config.node.region, "ap-south-1")
        self.assertEqual(config.api.listen, "tcp:1")

    def test_options_override_environment(self) -> None:
        """
        Command-line options override environment variables; options that
        were not given (None) do not.
        """
        path = self.toml('[node]\nregion = "eu-west-1"\n')
        config = self.load(
            overrides={"node.region": "sa-east-1", "api.listen": None},
            environ={"REGION": "ap-south-1", "API_LISTEN_ADDR": "tcp:9000"},
            path=path,
        )
        self.assertEqual(config.node.region, "sa-east-1")
        self.assertEqual(config.api.listen, "tcp:9000")

    def test_architecture_environment_names(self) -> None:
        """
        The environment names of ARCHITECTURE §2 set their keys, with lists
        comma-separated and booleans spelled as words.
        """
        key = "ab" * 32
        config = self.load(
            environ={
                "GLOBAL_DATABASE_URL": "postgresql://a@h/g",
                "REGIONAL_DATABASE_URL": "postgresql://a@h/r",
                "REGION": "r1",
                "ANVIL_SECRET_ENCRYPTION_KEY": key,
                "CLUSTER_SECRET": "s3cret",
                "API_LISTEN_ADDR": "tcp:8000:interface=127.0.0.1",
                "CLUSTER_LISTEN_ADDR": "tcp:8001",
                "PUBLIC_API_ADDR": "http://10.0.0.1:8000",
                "PUBLIC_CLUSTER_ADDRS": "10.0.0.1:8001, [::1]:8001",
                "BOOTSTRAP_ADDRS": "10.0.0.2:8001",
                "INIT_CLUSTER": "true",
            }
        )
        self.assertEqual(config.database.global_url, "postgresql://a@h/g")
        self.assertEqual(config.database.regional_url, "postgresql://a@h/r")
        self.assertEqual(config.node.region, "r1")
        self.assertEqual(config.secrets.encryption_key, key)
        self.assertEqual(config.cluster.secret, "s3cret")
        self.assertEqual(config.api.listen, "tcp:8000:interface=127.0.0.1")
        self.assertEqual(config.cluster.listen, "tcp:8001")
        self.assertEqual(config.api.public_addr, "http://10.0.0.1:8000")
        self.assertEqual(config.cluster.public_addrs, ("10.0.0.1:8001", "[::1]:8001"))
        self.assertEqual(config.cluster.bootstrap_addrs, ("10.0.0.2:8001",))
        self.assertTrue(config.cluster.init)
        self.assertFalse(config.embedded)

    def test_relative_paths(self) -> None:
        """
        Relative data and storage directories are resolved against the
        working directory at load time.
        """
        config = self.load(
            environ={"ANVIL_DATA_DIR": "d", "ANVIL_STORAGE_DIRS": "s1,s2"}
        )
        self.assertEqual(config.node.data_dir, os.path.join(self.dir, "d"))
        self.assertEqual(
            config.storage_dirs,
            (os.path.join(self.dir, "s1"), os.path.join(self.dir, "s2")),
        )


class InvalidConfigurationTests(ConfigTestMixin, SynchronousTestCase):
    """
    Every invalid configuration is one sentence naming the key.
    """

    def test_unknown_key(self) -> None:
        """
        An unknown key in the file names the key and the known ones.
        """
        message = self.error(path=self.toml('[api]\nlisen = "tcp:1"\n'))
        self.assertIn("unknown key api.lisen", message)
        self.assertIn("listen", message)

    def test_unknown_section(self) -> None:
        """
        An unknown section is rejected.
        """
        self.assertIn("unknown section [apis]", self.error(path=self.toml("[apis]\n")))

    def test_wrong_type_in_file(self) -> None:
        """
        A value of the wrong type in the file names the key and the type.
        """
        message = self.error(path=self.toml('[erasure]\nk = "four"\n'))
        self.assertIn("erasure.k", message)
        self.assertIn("an integer", message)

    def test_not_toml(self) -> None:
        """
        A file that is not TOML is reported as such.
        """
        self.assertIn("not valid TOML", self.error(path=self.toml("[node\n")))

    def test_missing_file(self) -> None:
        """
        A configuration file that does not exist is reported.
        """
        self.assertIn("does not exist", self.error(path=os.path.join(self.dir, "nope")))

    def test_malformed_listen_endpoint(self) -> None:
        """
        Malformed endpoint strings name the key and the parser's complaint.
        """
        for bad in ("tcp:notaport", "bogus:1", "tcp:70000"):
            message = self.error(environ={"API_LISTEN_ADDR": bad})
            self.assertIn("api.listen", message)
            self.assertIn("not a valid listen endpoint", message)
        self.assertIn(
            "cluster.listen", self.error(environ={"CLUSTER_LISTEN_ADDR": "tcp:x"})
        )

    def test_encryption_key_not_hex64(self) -> None:
        """
        An encryption key that is not 64 hex characters is rejected.
        """
        for bad in ("abc", "g" * 64, "a" * 63):
            message = self.error(environ={"ANVIL_SECRET_ENCRYPTION_KEY": bad})
            self.assertIn("ANVIL_SECRET_ENCRYPTION_KEY", message)
            self.assertIn("64 hex characters", message)

    def test_key_required_with_external_databases(self) -> None:
        """
        External databases need the shared encryption key.
        """
        message = self.error(
            environ={
                "GLOBAL_DATABASE_URL": "postgresql://h/g",
                "REGIONAL_DATABASE_URL": "postgresql://h/r",
            }
        )
        self.assertIn("ANVIL_SECRET_ENCRYPTION_KEY", message)
        self.assertIn("required", message)

    def test_one_database_url(self) -> None:
        """
        Configuring only one database URL is an error naming the other.
        """
        message = self.error(environ={"GLOBAL_DATABASE_URL": "postgresql://h/g"})
        self.assertIn("database.regional_url is empty", message)

    def test_malformed_database_url(self) -> None:
        """
        A database URL libpq cannot parse names the key.
        """
        message = self.error(
            environ={
                "GLOBAL_DATABASE_URL": "postgresql://h/g",
                "REGIONAL_DATABASE_URL": "host=x bogus_option=1",
                "ANVIL_SECRET_ENCRYPTION_KEY": "0" * 64,
            }
        )
        self.assertIn("database.regional_url is not a valid libpq URL", message)

    def test_unwritable_data_dir(self) -> None:
        """
        A data directory that cannot be created or written names the key.
        """
        blocker = os.path.join(self.dir, "file")
        with open(blocker, "w") as f:
            f.write("x")
        message = self.error(environ={"ANVIL_DATA_DIR": os.path.join(blocker, "d")})
        self.assertIn("node.data_dir", message)
        self.assertIn("is not usable", message)

    def test_bad_environment_values(self) -> None:
        """
        Environment strings that do not parse name the variable.
        """
        message = self.error(environ={"INIT_CLUSTER": "maybe"})
        self.assertIn("INIT_CLUSTER", message)
        message = self.error(environ={"ANVIL_ERASURE_K": "x"})
        self.assertIn("ANVIL_ERASURE_K", message)

    def test_bad_erasure_parameters(self) -> None:
        """
        Impossible erasure parameters and stripe sizes are rejected.
        """
        self.assertIn("erasure.k=0", self.error(environ={"ANVIL_ERASURE_K": "0"}))
        self.assertIn(
            "storage.stripe_size", self.error(environ={"ANVIL_STRIPE_SIZE": "1000003"})
        )

    def test_bad_addresses(self) -> None:
        """
        Cluster addresses must be host:port and the public API address a URL.
        """
        self.assertIn(
            "cluster.bootstrap_addrs",
            self.error(environ={"BOOTSTRAP_ADDRS": "nohostport"}),
        )
        self.assertIn(
            "api.public_addr", self.error(environ={"PUBLIC_API_ADDR": "ftp:/x"})
        )

    def test_bad_region_and_log_format(self) -> None:
        """
        Region names and log formats are checked.
        """
        self.assertIn("node.region", self.error(environ={"REGION": "Bad Region"}))
        self.assertIn("node.log_format", self.error(environ={"ANVIL_LOG_FORMAT": "xml"}))


class SampleTests(SynchronousTestCase):
    """
    C{etc/anvil.toml.sample} documents exactly the schema.
    """

    def test_sample_is_current(self) -> None:
        """
        The committed sample equals what the schema renders (regenerate with
        C{python -m anvil.config > etc/anvil.toml.sample}).
        """
        self.assertEqual(_SAMPLE.getContent().decode("utf-8"), render_sample())

    def test_sample_lists_every_key_with_its_default(self) -> None:
        """
        Uncommenting every setting in the sample gives a valid file whose
        values are the defaults, key for key.
        """
        lines = []
        for line in _SAMPLE.getContent().decode("utf-8").splitlines():
            if line.startswith("["):
                lines.append(line)
            elif line.startswith("# ") and " = " in line and not line.startswith("# Environment"):
                lines.append(line[2:])
        document = tomllib.loads("\n".join(lines))
        found = {
            f"{section}.{name}": value
            for section, body in document.items()
            for name, value in body.items()
        }
        expected = {
            k.dotted: list(k.default) if isinstance(k.default, tuple) else k.default
            for k in KEYS
        }
        self.assertEqual(found, expected)
