"""Child processes started with `subprocess.Popen` and awaited through a pidfd.

The services run on uvloop, whose `subprocess_exec` cannot start a child under another uid
(`user`, `group`, `extra_groups`); the standard library's Popen can, and a pidfd, readable once
the child has exited, tells the event loop when to reap it (only this code reaps its own pids).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import Any


class Child:
    """A Popen'd child: its pid, whether it runs, and its exit code once reaped (negative: the
    signal that killed it, as in asyncio)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._exited = asyncio.Event()
        self._pidfd = os.pidfd_open(popen.pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    @classmethod
    def start(cls, args: list[str], **popen: Any) -> Child:
        return cls(subprocess.Popen(args, **popen))

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.popen.returncode is not None
        return self.popen.returncode

    cause = ""  # its code says all there is

    def signal(self, sig: int) -> None:
        """`sig` to its process group (a worker started in its own session leads it)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        if self.running:
            self.popen.kill()

    def _reap(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.popen.wait()  # it has exited: this reaps it at once
        self._exited.set()


async def run(args: list[str], **popen: Any) -> int:
    """Run a child to its end; a cancelled caller kills it first (none outlives its caller)."""
    child = Child.start(args, **popen)
    try:
        return await child.wait()
    except asyncio.CancelledError:
        child.kill()
        await asyncio.shield(child.wait())
        raise
