"""The deployment's generated secrets (services starting together all read the one secret), and
sealed credentials: bound to their worker, the keys rotating under them."""

from __future__ import annotations

import json
import sqlite3
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from services.cli.keys import reseal_table
from services.secrets import Keys, Sealer, SealError, _read_or_create, read_keys, write_keys
from services.settings import Settings


def test_services_racing_to_create_a_secret_all_get_the_same_whole_value(tmp_path: Path) -> None:
    path = tmp_path / "var" / "secret.key"
    start = threading.Barrier(8)
    made = iter(f"value-{n}" for n in range(100))
    lock = threading.Lock()

    def slow_make() -> str:  # a creator still writing while the others look
        with lock:
            value = next(made)
        time.sleep(0.2)
        return value

    def service() -> tuple[str, bool]:
        start.wait()
        return _read_or_create(path, slow_make)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: service(), range(8)))
    values = {value for value, _ in results}
    assert len(values) == 1 and values != {""}, results  # nobody read a half-written file
    assert sum(created for _, created in results) == 1
    assert path.read_text().strip() in values
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.key"]  # no drafts left


# ---------------------------------------------------------------- sealing, binding, rotation

KEY_A, KEY_B = Fernet.generate_key().decode(), Fernet.generate_key().decode()
CREDENTIALS = {"apiKey": "ak-Z9-secret-key", "apiSecret": "sk-Q3-secret-value"}


def test_sealed_credentials_open_for_their_worker_only() -> None:
    sealer = Sealer(KEY_A)
    sealed = sealer.seal(CREDENTIALS, user_id="alice", worker_id="worker-1")
    assert sealer.open(sealed, user_id="alice", worker_id="worker-1") == CREDENTIALS
    for user, worker in (("mallory", "worker-1"), ("alice", "worker-2"), ("mallory", "w-9")):
        with pytest.raises(SealError, match="belong to another job") as refused:
            sealer.open(sealed, user_id=user, worker_id=worker)
        message = str(refused.value)
        assert not any(part in message for part in (*CREDENTIALS.values(), "alice", "worker-1"))


def test_a_blob_sealed_before_binding_opens_with_a_warning_and_reseals_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    legacy = Fernet(KEY_A.encode()).encrypt(json.dumps(CREDENTIALS).encode()).decode()
    sealer = Sealer(KEY_A)
    assert sealer.open(legacy, user_id="alice", worker_id="worker-1") == CREDENTIALS
    assert "sealed before they were bound" in caplog.text
    bound = sealer.reseal(legacy, user_id="alice", worker_id="worker-1")
    with pytest.raises(SealError, match="another job"):
        sealer.open(bound, user_id="alice", worker_id="worker-2")


def test_keys_rotate_newest_first_and_a_retired_key_opens_nothing(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    write_keys(path, [KEY_A])
    sealer = Sealer(Keys(path=path))
    old = sealer.seal(CREDENTIALS, user_id="alice", worker_id="w-1")
    write_keys(path, [KEY_B, KEY_A])  # added: a running service takes it up at its next use
    new = sealer.reseal(old, user_id="alice", worker_id="w-1")
    assert Fernet(KEY_B.encode()).decrypt(new.encode())
    assert sealer.open(old, user_id="alice", worker_id="w-1") == CREDENTIALS  # still, until...
    write_keys(path, [KEY_B])  # ... the old key is retired
    with pytest.raises(SealError, match="could not be opened"):
        sealer.open(old, user_id="alice", worker_id="w-1")
    assert sealer.open(new, user_id="alice", worker_id="w-1") == CREDENTIALS
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_keys(path) == [KEY_B]


def test_a_malformed_key_never_reaches_the_key_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    write_keys(path, [KEY_A])
    with pytest.raises(ValueError):
        write_keys(path, ["not-a-key", KEY_A])
    assert read_keys(path) == [KEY_A]
    with pytest.raises(SealError, match="malformed"):
        Sealer("not-a-key")


def test_the_key_file_is_made_once_with_one_key_and_keys_from_the_environment_win(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    sealed = Sealer.for_settings(settings).seal(CREDENTIALS, user_id="u", worker_id="w")
    assert len(read_keys(tmp_path / "secret.key")) == 1
    assert Sealer.for_settings(settings).open(sealed, user_id="u", worker_id="w") == CREDENTIALS
    fixed = Settings(data_dir=tmp_path, secret_key=f"{KEY_B},{KEY_A}")
    assert Sealer.for_settings(fixed).open(
        Sealer(KEY_A).seal(CREDENTIALS, user_id="u", worker_id="w"), user_id="u", worker_id="w"
    ) == CREDENTIALS


async def test_a_store_is_resealed_under_the_newest_key_row_by_row(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'scheduler.db'}"
    old, new = Sealer(KEY_A), Sealer(f"{KEY_B},{KEY_A}")
    rows = {f"w-{n}": old.seal(CREDENTIALS, user_id="alice", worker_id=f"w-{n}") for n in range(3)}
    rows["w-copied"] = rows["w-0"]  # replayed into another job: refused, left as it is
    with sqlite3.connect(tmp_path / "scheduler.db") as db:
        db.execute("CREATE TABLE jobs (worker_id TEXT, user_id TEXT, credentials_sealed TEXT)")
        db.executemany("INSERT INTO jobs VALUES (?, 'alice', ?)", rows.items())
    assert await reseal_table(url, "jobs", new) == (3, 1)
    with sqlite3.connect(tmp_path / "scheduler.db") as db:
        after = dict(db.execute("SELECT worker_id, credentials_sealed FROM jobs"))
    only_b = Sealer(KEY_B)
    for n in range(3):
        assert only_b.open(after[f"w-{n}"], user_id="alice", worker_id=f"w-{n}") == CREDENTIALS
    assert after["w-copied"] == rows["w-0"]
    with pytest.raises(ValueError, match="not a table"):
        await reseal_table(url, "users; DROP TABLE jobs", new)
