"""`python -m services.worker`: run one worker from the environment its host prepared."""

import os
import sys

from services.worker.runtime import run_worker

if __name__ == "__main__":
    sys.exit(run_worker(os.environ))
