# -*- test-case-name: tests.integration.test_s3_clients -*-
"""
Real S3 clients against a real C{twistd anvil} node on the embedded
default: the AWS CLI (C{aws s3} and C{aws s3api}), rclone and s3cmd sync a
tree of files up and back down and the bytes are compared.

The tree has nested directories, an empty file, names with spaces, C{+},
C{%} and non-ASCII characters, and a multi-MiB file large enough for every
client to upload it in parts (each client's multipart threshold is set to
5 MiB), so multipart uploads are exercised the way each client does them.

A client whose binary is not installed is skipped with the reason; the
Debian packages are C{awscli}, C{rclone} and C{s3cmd}.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Mapping

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.nodeproc import NodeProcess, child_env, short_tmpdir

MiB = 1024 * 1024

#: Relative path -> size; contents are derived from the path.
TREE: dict[str, int] = {
    "top.txt": 1234,
    "empty.bin": 0,
    "with space/file one.txt": 777,
    "nested/deeper/deepest/leaf.dat": 70_000,
    "nested/a+b=c.txt": 42,
    "nested/percent%20name.txt": 99,
    "ünïcödé/日本.txt": 321,
    "big/multipart.bin": 12 * MiB + 4321,
}


def _content(path: str, size: int) -> bytes:
    """Deterministic, path-specific bytes (no two files share content)."""
    seed = hashlib.sha256(path.encode()).digest()
    block = hashlib.sha256(seed + b"block").digest() * 2048  # 64 KiB
    data = (seed + block * (size // len(block) + 1))[:size]
    return data


def make_tree(root: str) -> None:
    """Write L{TREE} under C{root}."""
    for path, size in TREE.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(_content(path, size))


def digest_tree(root: str) -> dict[str, str]:
    """@return: relative path -> SHA-256 of every file under C{root}."""
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            full = os.path.join(directory, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def expected_digests() -> dict[str, str]:
    """@return: the digests of L{TREE}."""
    return {path: hashlib.sha256(_content(path, size)).hexdigest() for path, size in TREE.items()}


def find_binary(name: str, preferred: tuple[str, ...] = ()) -> str:
    """
    @return: the client's executable.
    @raise SkipTest: when it is not installed.
    """
    for candidate in preferred:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise SkipTest(
            f"{name} is not installed (Debian package: {name if name != 'aws' else 'awscli'})"
        )
    return found


class ClientTestCase(SynchronousTestCase):
    """
    A node for one test, its credentials, and a scratch directory.
    """

    def setUp(self) -> None:
        """Start a node and build the local tree."""
        self.base = short_tmpdir(self)
        data_dir = os.path.join(self.base, "node")
        os.makedirs(data_dir)
        self.node = NodeProcess(self, data_dir).start()
        self.node.wait_ready(90)
        self.credentials = self.node.credentials()
        self.tree = os.path.join(self.base, "tree")
        make_tree(self.tree)
        self.assertEqual(digest_tree(self.tree), expected_digests())

    def run_client(
        self, argv: list[str], env: Mapping[str, str], timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """
        Run a client command; fail the test with its output if it fails.
        """
        env = dict(env)
        # The clients are other programs (Debian's aws and s3cmd run on the
        # system Python): the path to our sources and venv, which trial's
        # workers put in PYTHONPATH, would make them import our packages.
        env.pop("PYTHONPATH", None)
        result = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,
            check=False,
        )
        if result.returncode != 0:
            self.fail(
                f"{argv!r} exited with {result.returncode}\nstdout:\n{result.stdout}\n"
                f"stderr:\n{result.stderr}\nnode log:\n{self.node.output()[-5000:]}"
            )
        return result

    def download_dir(self, name: str) -> str:
        """@return: a fresh empty directory for a download."""
        path = os.path.join(self.base, name)
        os.makedirs(path)
        return path


class AwsCliTests(ClientTestCase):
    """
    The AWS CLI.
    """

    def aws_env(self) -> dict[str, str]:
        """The environment for C{aws}: keys, region, multipart at 5 MiB."""
        config = os.path.join(self.base, "aws-config")
        with open(config, "w") as f:
            f.write(
                "[default]\n"
                "region = us-east-1\n"
                "s3 =\n"
                "    multipart_threshold = 5MB\n"
                "    multipart_chunksize = 5MB\n"
                "    addressing_style = path\n"
            )
        env = child_env(
            {
                "AWS_ACCESS_KEY_ID": self.credentials["access_key_id"],
                "AWS_SECRET_ACCESS_KEY": self.credentials["secret_access_key"],
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": config,
                "AWS_SHARED_CREDENTIALS_FILE": os.path.join(self.base, "no-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_PAGER": "",
            }
        )
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
            env.pop(name, None)
        return env

    def aws(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run C{aws --endpoint-url <node> ARGS}."""
        binary = find_binary("aws", ("/usr/bin/aws",))
        return self.run_client([binary, "--endpoint-url", self.node.url, *args], self.aws_env())

    def test_s3_commands(self) -> None:
        """aws s3 mb/cp/sync/ls/rm move the tree up and back down byte for byte."""
        self.aws("s3", "mb", "s3://cli-bucket")
        self.aws(
            "s3",
            "cp",
            os.path.join(self.tree, "big/multipart.bin"),
            "s3://cli-bucket/single/big.bin",
        )
        self.aws("s3", "sync", self.tree, "s3://cli-bucket/tree/")

        listing = self.aws("s3", "ls", "--recursive", "s3://cli-bucket/tree/").stdout
        for path in TREE:
            self.assertIn("tree/" + path, listing)

        # The large file went up in parts: its ETag is a multipart ETag.
        head = json.loads(
            self.aws(
                "s3api", "head-object", "--bucket", "cli-bucket", "--key", "tree/big/multipart.bin"
            ).stdout
        )
        self.assertRegex(head["ETag"], r'^"[0-9a-f]{32}-3"$')
        self.assertEqual(head["ContentLength"], TREE["big/multipart.bin"])

        down = self.download_dir("down")
        self.aws("s3", "sync", "s3://cli-bucket/tree/", down)
        self.assertEqual(digest_tree(down), expected_digests())

        single = os.path.join(self.base, "single.bin")
        self.aws("s3", "cp", "s3://cli-bucket/single/big.bin", single)
        with open(single, "rb") as f:
            self.assertEqual(f.read(), _content("big/multipart.bin", TREE["big/multipart.bin"]))

        # A second sync has nothing to do.
        again = self.aws("s3", "sync", self.tree, "s3://cli-bucket/tree/").stdout
        self.assertNotIn("upload:", again)

        self.aws("s3", "rm", "--recursive", "s3://cli-bucket/")
        listing = self.aws("s3", "ls", "--recursive", "s3://cli-bucket/").stdout
        self.assertEqual(listing.strip(), "")
        self.aws("s3", "rb", "s3://cli-bucket")

    def test_s3api_multipart(self) -> None:
        """aws s3api create-multipart-upload, upload-part, list-parts and complete-multipart-upload."""
        self.aws("s3api", "create-bucket", "--bucket", "api-bucket")
        created = json.loads(
            self.aws(
                "s3api",
                "create-multipart-upload",
                "--bucket",
                "api-bucket",
                "--key",
                "parts/object.bin",
            ).stdout
        )
        upload_id = created["UploadId"]
        pieces = [
            _content("part-one", 5 * MiB),
            _content("part-two", 5 * MiB),
            _content("three", 1000),
        ]
        parts = []
        for number, piece in enumerate(pieces, 1):
            path = os.path.join(self.base, f"part{number}")
            with open(path, "wb") as f:
                f.write(piece)
            uploaded = json.loads(
                self.aws(
                    "s3api",
                    "upload-part",
                    "--bucket",
                    "api-bucket",
                    "--key",
                    "parts/object.bin",
                    "--upload-id",
                    upload_id,
                    "--part-number",
                    str(number),
                    "--body",
                    path,
                ).stdout
            )
            self.assertEqual(uploaded["ETag"], f'"{hashlib.md5(piece).hexdigest()}"')
            parts.append({"PartNumber": number, "ETag": uploaded["ETag"]})

        listed = json.loads(
            self.aws(
                "s3api",
                "list-parts",
                "--bucket",
                "api-bucket",
                "--key",
                "parts/object.bin",
                "--upload-id",
                upload_id,
            ).stdout
        )
        self.assertEqual([p["PartNumber"] for p in listed["Parts"]], [1, 2, 3])
        uploads = json.loads(
            self.aws("s3api", "list-multipart-uploads", "--bucket", "api-bucket").stdout
        )
        self.assertEqual([u["UploadId"] for u in uploads["Uploads"]], [upload_id])

        completed = json.loads(
            self.aws(
                "s3api",
                "complete-multipart-upload",
                "--bucket",
                "api-bucket",
                "--key",
                "parts/object.bin",
                "--upload-id",
                upload_id,
                "--multipart-upload",
                json.dumps({"Parts": parts}),
            ).stdout
        )
        md5s = b"".join(hashlib.md5(p).digest() for p in pieces)
        self.assertEqual(completed["ETag"], f'"{hashlib.md5(md5s).hexdigest()}-3"')

        out = os.path.join(self.base, "object.bin")
        got = json.loads(
            self.aws(
                "s3api",
                "get-object",
                "--bucket",
                "api-bucket",
                "--key",
                "parts/object.bin",
                "--part-number",
                "2",
                out,
            ).stdout
        )
        self.assertEqual(got["PartsCount"], 3)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), pieces[1])
        self.aws("s3api", "get-object", "--bucket", "api-bucket", "--key", "parts/object.bin", out)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), b"".join(pieces))

        # An aborted upload is gone.
        second = json.loads(
            self.aws(
                "s3api", "create-multipart-upload", "--bucket", "api-bucket", "--key", "aborted"
            ).stdout
        )["UploadId"]
        self.aws(
            "s3api",
            "abort-multipart-upload",
            "--bucket",
            "api-bucket",
            "--key",
            "aborted",
            "--upload-id",
            second,
        )
        uploads = json.loads(
            self.aws("s3api", "list-multipart-uploads", "--bucket", "api-bucket").stdout or "{}"
        )
        self.assertEqual(uploads.get("Uploads", []), [])


class RcloneTests(ClientTestCase):
    """
    rclone with the generic S3 provider.
    """

    def rclone(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run C{rclone ARGS} with an C{anvil:} remote configured from the environment."""
        binary = find_binary("rclone")
        config = os.path.join(self.base, "rclone.conf")
        open(config, "a").close()
        env = child_env(
            {
                "RCLONE_CONFIG": config,
                "RCLONE_CONFIG_ANVIL_TYPE": "s3",
                "RCLONE_CONFIG_ANVIL_PROVIDER": "Other",
                "RCLONE_CONFIG_ANVIL_ACCESS_KEY_ID": self.credentials["access_key_id"],
                "RCLONE_CONFIG_ANVIL_SECRET_ACCESS_KEY": self.credentials["secret_access_key"],
                "RCLONE_CONFIG_ANVIL_ENDPOINT": self.node.url,
                "RCLONE_CONFIG_ANVIL_REGION": "us-east-1",
                "RCLONE_CONFIG_ANVIL_FORCE_PATH_STYLE": "true",
                "RCLONE_CONFIG_ANVIL_UPLOAD_CUTOFF": "5M",
                "RCLONE_CONFIG_ANVIL_CHUNK_SIZE": "5M",
            }
        )
        # rclone reads a CA bundle from this variable and fails if it is
        # set to something it cannot use.
        env.pop("AWS_CA_BUNDLE", None)
        return self.run_client([binary, "--retries", "1", "--low-level-retries", "1", *args], env)

    def test_sync_up_and_down(self) -> None:
        """rclone mkdir/sync/ls/check/delete move the tree up and back down byte for byte."""
        self.rclone("mkdir", "anvil:rclone-bucket")
        self.rclone("sync", self.tree, "anvil:rclone-bucket/tree")
        listing = self.rclone("ls", "anvil:rclone-bucket/tree").stdout
        sizes = {}
        for line in listing.splitlines():
            size, path = line.strip().split(" ", 1)
            sizes[path] = int(size)
        self.assertEqual(sizes, TREE)
        self.rclone("check", self.tree, "anvil:rclone-bucket/tree")

        down = self.download_dir("down")
        self.rclone("sync", "anvil:rclone-bucket/tree", down)
        found = digest_tree(down)
        # rclone does not create empty directories from object stores, but
        # an empty file is a file.
        self.assertEqual(found, expected_digests())

        self.rclone("delete", "anvil:rclone-bucket")
        self.assertEqual(self.rclone("ls", "anvil:rclone-bucket").stdout.strip(), "")
        self.rclone("rmdir", "anvil:rclone-bucket")


class S3cmdTests(ClientTestCase):
    """
    s3cmd with SigV4.
    """

    def s3cmd(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run C{s3cmd ARGS} against the node (keys in a temporary config)."""
        binary = find_binary("s3cmd")
        host = self.node.url.split("://", 1)[1]
        config = os.path.join(self.base, "s3cfg")
        with open(config, "w") as f:
            f.write(
                "[default]\n"
                f"access_key = {self.credentials['access_key_id']}\n"
                f"secret_key = {self.credentials['secret_access_key']}\n"
                f"host_base = {host}\n"
                f"host_bucket = {host}\n"
                "bucket_location = us-east-1\n"
                "use_https = False\n"
                "signature_v2 = False\n"
                "multipart_chunk_size_mb = 5\n"
            )
        env = child_env({"HOME": self.base})
        return self.run_client(
            [
                binary,
                "-c",
                config,
                "--host",
                host,
                "--host-bucket",
                host,
                "--no-ssl",
                "--region",
                "us-east-1",
                *args,
            ],
            env,
        )

    def test_sync_up_and_down(self) -> None:
        """s3cmd mb/sync/ls/get/del move the tree up and back down byte for byte."""
        self.s3cmd("mb", "s3://s3cmd-bucket")
        self.s3cmd("sync", self.tree + "/", "s3://s3cmd-bucket/tree/")
        listing = self.s3cmd("ls", "--recursive", "s3://s3cmd-bucket/tree/").stdout
        for path in TREE:
            self.assertIn("s3://s3cmd-bucket/tree/" + path, listing)
        info = self.s3cmd("info", "s3://s3cmd-bucket/tree/big/multipart.bin").stdout
        # Uploaded in 5 MiB parts.
        self.assertRegex(info, r"MD5 sum:\s+\S+")

        down = self.download_dir("down")
        self.s3cmd("sync", "s3://s3cmd-bucket/tree/", down + "/")
        self.assertEqual(digest_tree(down), expected_digests())

        single = os.path.join(self.base, "top.txt")
        self.s3cmd("get", "s3://s3cmd-bucket/tree/top.txt", single)
        with open(single, "rb") as f:
            self.assertEqual(f.read(), _content("top.txt", TREE["top.txt"]))

        self.s3cmd("del", "--recursive", "--force", "s3://s3cmd-bucket/tree/")
        self.assertEqual(self.s3cmd("ls", "--recursive", "s3://s3cmd-bucket").stdout.strip(), "")
        self.s3cmd("rb", "s3://s3cmd-bucket")
