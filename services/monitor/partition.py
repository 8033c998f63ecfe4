"""One partition of the event log folded in a process of its own, for `replay_partitioned`:

    python -m services.monitor.partition PATH UNTIL PART PARTS

writes the pickled (Folded, rows read) of `fold_partition` to stdout.
"""

import os
import pickle
import sys

from services.monitor.replay import fold_partition

if __name__ == "__main__":
    path, until, part, parts = sys.argv[1], *map(int, sys.argv[2:5])
    result = fold_partition(path, until, part, parts)
    sys.stdout.buffer.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.flush()
    os._exit(0)  # the fold's objects need no freeing one by one: the process ends
