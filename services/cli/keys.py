"""`runner keys`: the sealing keys (list, add, re-seal what is stored, retire the old; `rotate`
does all three), named by fingerprint only: no command prints a key it did not make.

The stores holding sealed credentials are the scheduler's `jobs` and each worker-host's
`local_workers`; `reseal_table` re-seals one in batches, each row only if unchanged meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import typer
from rich.console import Console
from sqlalchemy import text

from services.cli.errors import fail
from services.database import Database
from services.secrets import (
    Sealer,
    SealError,
    fingerprint,
    key_file,
    new_key,
    read_keys,
    secret_key,
    write_keys,
)
from services.settings import Settings, async_driver

keys_app = typer.Typer(no_args_is_help=True, help="The keys sealing users' credentials.")
console = Console()

TABLES = ("jobs", "local_workers")  # the scheduler's and a worker-host's
BATCH = 500


def _settings() -> Settings:
    """Settings with the data dir where the key file is (`runner up` keeps it in keys/)."""
    return Settings().own("keys")


def _file(settings: Settings) -> Path:
    if settings.secret_key:
        fail("the keys come from RUNNER_SECRET_KEY: set it to the new key, a comma and the old "
             "ones (newest first), restart the gateways and worker-hosts, and re-seal "
             "(runner keys reseal); or keep them in a file (RUNNER_SECRET_KEY_FILE)")
    path = key_file(settings)
    secret_key(settings)  # made at first use, as a service would
    return path


async def reseal_table(url: str, table: str, sealer: Sealer) -> tuple[int, int]:
    """Re-seal every sealed credential in `table` of the store at `url` under the newest key,
    bound to its worker: (re-sealed, refused). A row changed meanwhile is left as it is."""
    if table not in TABLES:
        raise ValueError(f"not a table of sealed credentials: {table!r}")
    database = Database(async_driver(url))
    resealed = refused = 0
    try:
        async with database.connect() as connection:
            rows = (await connection.execute(text(
                f"SELECT worker_id, user_id, credentials_sealed FROM {table}"))).all()
        update = text(f"UPDATE {table} SET credentials_sealed = :new "
                      "WHERE worker_id = :worker AND credentials_sealed = :old")
        for start in range(0, len(rows), BATCH):
            changes = []
            for worker_id, user_id, sealed in rows[start:start + BATCH]:
                try:
                    new = sealer.reseal(sealed, user_id=user_id, worker_id=worker_id)
                except SealError:
                    refused += 1
                    continue
                changes.append({"new": new, "worker": worker_id, "old": sealed})
            if changes:
                async with database.begin() as connection:
                    for change in changes:
                        resealed += (await connection.execute(update, change)).rowcount  # type: ignore[attr-defined]
    finally:
        await database.dispose()
    return resealed, refused


def local_stores(settings: Settings, host_ids: list[str]) -> list[tuple[str, str]]:
    """The stores of sealed credentials this machine holds: the scheduler's, and the
    worker-hosts' named by `host_ids` or, on SQLite, found in the data dir."""
    stores = []
    scheduler = settings.own("scheduler")
    if settings.database_url or (scheduler.data_dir / "scheduler.db").exists():
        stores.append((scheduler.database_for("scheduler"), "jobs"))
    for host_id in host_ids:
        name = f"worker-host-{host_id}"
        stores.append((settings.own(name).database_for(name), "local_workers"))
    if not host_ids and not settings.database_url:
        for db in [*settings.data_dir.glob("worker-host-*.db"),
                   *settings.data_dir.glob("worker-host-*/worker-host-*.db")]:
            stores.append((f"sqlite:///{db.resolve()}", "local_workers"))
    return stores


@keys_app.command("list")
def list_keys() -> None:
    """The keys' fingerprints, newest (the one that seals) first."""
    for n, key in enumerate(read_keys(_file(_settings()))):
        console.print(f"{fingerprint(key)}{'  (seals)' if n == 0 else ''}")


@keys_app.command("add")
def add() -> None:
    """A new key, first in the key file: services seal with it from their next seal on, and
    still open what the older keys sealed."""
    path = _file(_settings())
    key = new_key()
    write_keys(path, [key, *read_keys(path)])
    console.print(f"added key {fingerprint(key)} (it seals from now on)")


@keys_app.command("reseal")
def reseal(
    host_id: list[str] = typer.Option([], "--host-id", help="a worker-host's store to re-seal "
                                      "[every one found in the data dir]"),
) -> None:
    """Re-seal every stored credential under the newest key (bound to its worker)."""
    settings = _settings()
    sealer = Sealer(secret_key(settings)) if settings.secret_key else Sealer.for_settings(settings)
    for url, table in local_stores(Settings(), host_id):
        done, refused = asyncio.run(reseal_table(url, table, sealer))
        console.print(f"{table} in {url.rsplit('/', 1)[-1]}: {done} re-sealed"
                      + (f", [red]{refused} could not be opened[/]" if refused else ""))


@keys_app.command("retire")
def retire(yes: bool = typer.Option(False, "--yes", help="retire them")) -> None:
    """Drop every key but the newest: what only they sealed can never be opened again."""
    path = _file(_settings())
    keys = read_keys(path)
    if len(keys) == 1:
        console.print("one key only: nothing to retire")
        return
    if not yes:
        fail(f"this retires {', '.join(map(fingerprint, keys[1:]))}: re-seal first "
             "(runner keys reseal), then pass --yes")
    write_keys(path, keys[:1])
    console.print(f"retired {', '.join(map(fingerprint, keys[1:]))}; {fingerprint(keys[0])} "
                  "is the only key")


@keys_app.command("rotate")
def rotate(
    grace: float = typer.Option(10.0, min=0, help="seconds between adding the key and re-sealing"
                                ": requests sealed under the old key meanwhile reach the stores"),
    host_id: list[str] = typer.Option([], "--host-id", help="as for reseal"),
    keep_old: bool = typer.Option(False, "--keep-old", help="do not retire the old keys (other "
                                  "machines' worker-host stores still to re-seal there)"),
) -> None:
    """Add a new key, re-seal every stored credential under it, retire the old keys. Running
    workers are untouched; a worker restarted afterwards opens its credentials with the new
    key; the old key then opens nothing stored."""
    add()
    time.sleep(grace)
    reseal(host_id=host_id)
    if not keep_old:
        retire(yes=True)
