# -*- test-case-name: tests.test_node -*-
"""
First start of a node on the embedded default.

A fresh single node must be usable at once: it gets a region, a C{default}
tenant and an C{admin} app allowed everything, and the app's keys are written
to C{<data-dir>/credentials.json} (mode 0600) for the operator and their S3
clients.  Later starts find the file and change nothing.
"""

from __future__ import annotations

import json
import os

from twisted.logger import Logger

from anvil.errors import AlreadyExists

_log = Logger()

DEFAULT_TENANT = "default"
ADMIN_APP = "admin"


def credentials_path(data_dir: str) -> str:
    """
    Where a node on the embedded default keeps its admin credentials.
    """
    return os.path.join(data_dir, "credentials.json")


async def ensure_region(store: object, region: str) -> None:
    """
    Make sure this node's region exists in the global database (every node
    does this; it is idempotent).
    """
    await store.create_region(region)  # type: ignore[attr-defined]


async def first_start(store: object, data_dir: str, region: str, endpoint: str) -> str | None:
    """
    Create the default tenant and admin app and write their credentials,
    unless an earlier start did.

    @param store: the L{anvil.meta.store.GlobalStore}.
    @param endpoint: the S3 endpoint URL clients should use.
    @return: the credentials file's path, or C{None} when it could not be
        written because the admin app exists without it.
    """
    path = credentials_path(data_dir)
    if os.path.exists(path):
        _log.info("S3 credentials of the admin app are in {path}", path=path)
        return path
    try:
        await store.create_tenant(DEFAULT_TENANT)  # type: ignore[attr-defined]
    except AlreadyExists:
        pass
    try:
        app = await store.create_app(DEFAULT_TENANT, ADMIN_APP)  # type: ignore[attr-defined]
    except AlreadyExists:
        _log.warn(
            "The app {app!r} exists but {path} is missing; not overwriting its "
            "secret. Run 'anvil-admin --data-dir {data_dir} app rotate-secret "
            "--app-name {app}' to get new keys.",
            app=ADMIN_APP, path=path, data_dir=data_dir,
        )
        return None
    try:
        await store.grant(ADMIN_APP, "*", "*")  # type: ignore[attr-defined]
    except AlreadyExists:
        pass
    document = {
        "access_key_id": app["client_id"],
        "secret_access_key": app["client_secret"],
        "region": region,
        "endpoint": endpoint,
        "tenant": DEFAULT_TENANT,
        "app": ADMIN_APP,
    }
    write_private_json(path, document)
    _log.info(
        "First start: created tenant {tenant!r} and app {app!r} (all rights); "
        "S3 credentials written to {path}",
        tenant=DEFAULT_TENANT, app=ADMIN_APP, path=path,
    )
    return path


def write_private_json(path: str, document: object) -> None:
    """
    Write C{document} to C{path} atomically, readable by its owner only.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)
