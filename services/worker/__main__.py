"""`python -m services.worker`: run one worker from the environment its host prepared, confined
first as `RUNNER_CONFINEMENT` says (its spawner has switched its uid before the exec)."""

import os
import sys

from services.worker.confinement import ENV_CONFINEMENT, Confinement, confine
from services.worker.runtime import EXIT_BAD_CONFIG, run_worker

if __name__ == "__main__":
    confined: list[str] = []
    if spec := os.environ.get(ENV_CONFINEMENT):
        try:
            confined = confine(Confinement.from_json(spec))
        except (OSError, ValueError) as exc:
            print(f"worker: cannot be confined as its host asked ({exc}); not started",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_CONFIG)
    sys.exit(run_worker(os.environ, confined))
