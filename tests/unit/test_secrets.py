"""The deployment's generated secrets: services starting together all read the one secret."""

from __future__ import annotations

import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.secrets import _read_or_create


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
