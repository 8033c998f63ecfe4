"""`python -m services.worker`: run one worker from the environment its host prepared, confined
first as `RUNNER_CONFINEMENT` says (its spawner has switched its uid before the exec). A
container worker writes its output to `RUNNER_WORKER_LOG` (its directory's log, mounted), the
file a process worker's host opens for it."""

import os
import sys

from services.worker.confinement import ENV_CONFINEMENT, Confinement, confine
from services.worker.protocol import ENV_WORKER_LOG
from services.worker.runtime import EXIT_BAD_CONFIG, run_worker


def write_to(path: str) -> None:
    """Stdout and stderr appended to `path`, never through a symbolic link."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


if __name__ == "__main__":
    if log_path := os.environ.get(ENV_WORKER_LOG):
        try:
            write_to(log_path)
        except OSError as exc:
            print(f"worker: cannot write its log {log_path} ({exc}); not started",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_CONFIG)
    confined: list[str] = []
    if spec := os.environ.get(ENV_CONFINEMENT):
        try:
            confined = confine(Confinement.from_json(spec))
        except (OSError, ValueError) as exc:
            print(f"worker: cannot be confined as its host asked ({exc}); not started",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_CONFIG)
    sys.exit(run_worker(os.environ, confined))
