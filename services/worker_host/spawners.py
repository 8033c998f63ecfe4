"""The spawner a worker-host's settings name, above the three kinds of spawner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.settings import Settings
from services.worker_host.container_spawner import ContainerSpawner
from services.worker_host.fork_spawner import ForkSpawner
from services.worker_host.isolation import Isolation
from services.worker_host.spawner import ExecSpawner, Spawner


def make_spawner(mode: str, workdir: Path, isolation: Isolation | None = None,
                 settings: Any = None, host_id: str = "") -> Spawner:
    """The spawner `RUNNER_SPAWN_MODE` names: "fork" (default), "exec" or "container" (which
    takes its engine and limits from `settings`, and labels its containers with `host_id`);
    its workers placed and confined by `isolation` (a host passes
    `Isolation.from_settings(settings)`)."""
    if mode == "container":
        return ContainerSpawner(settings or Settings(), host_id, workdir, isolation)
    if mode == "exec":
        return ExecSpawner(isolation)
    if mode == "fork":
        return ForkSpawner(workdir, isolation)
    raise ValueError(f"unknown spawn mode {mode!r} (fork, exec or container)")
