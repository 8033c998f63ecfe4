"""A worker-host's market-data feed as its workers get it: one feed process (`feed.py`) started
at the first subscription, its prices relayed to each subscribed worker as `Price` lines on its
control channel, since workers open no socket of their own (docs/SECURITY.md). A feed process
that dies is started again; meanwhile workers ask their exchange."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from services.worker import protocol
from services.worker_host.spawner import WorkerProcess, base_environment

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (source, instrument)
READY_TIMEOUT = 60.0  # seconds a feed process may take to start (it imports ccxt)
RETRY = (1.0, 30.0)  # seconds between restarts of a failed feed: first, ceiling (doubling)


class FeedRelay:
    def __init__(self, urls: Mapping[str, str], log_file: Path) -> None:
        self.urls, self.log_file = dict(urls), log_file
        self.subscribers: dict[Key, dict[str, WorkerProcess]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.process: asyncio.subprocess.Process | None = None

    def subscribe(self, worker: WorkerProcess, keys: Iterable[Key]) -> None:
        """Relay the prices of `keys` to `worker` from now on (the latest at once, if known)."""
        new = [key for key in keys if key not in self.subscribers]
        for key in keys:
            self.subscribers.setdefault(key, {})[worker.worker_id] = worker
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="feed-relay")
        elif new and self._writer is not None:
            self._ask(new)

    def forget(self, worker_id: str) -> None:
        for workers in self.subscribers.values():
            workers.pop(worker_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _ask(self, keys: Iterable[Key]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps({"subscribe": [list(key) for key in keys]}).encode()
                           + b"\n")

    async def _run(self) -> None:
        delay = RETRY[0]
        while True:
            workdir = Path(tempfile.mkdtemp(prefix="runner-feed-"))  # 0700, a short path
            try:
                await self._relay(workdir / "feed.sock")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("market-data feed failed (%s); starting it again in %gs",
                            exc or type(exc).__name__, delay)
            finally:
                await self._stop_process()
                shutil.rmtree(workdir, ignore_errors=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY[1])

    async def _relay(self, path: Path) -> None:
        """Start the feed, subscribe what is wanted, and relay its prices until it goes."""
        with open(self.log_file, "ab") as feed_log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.worker_host.feed", str(path),
                "--urls", json.dumps(self.urls), env=base_environment(),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=feed_log)
        assert self.process.stdout is not None
        ready = await asyncio.wait_for(self.process.stdout.readline(), READY_TIMEOUT)
        if ready.strip() != b"ready":
            raise RuntimeError(f"the feed process did not start (see {self.log_file.name})")
        reader, self._writer = await asyncio.open_unix_connection(str(path))
        self._ask(self.subscribers)
        log.info("market-data feed started (pid %d)", self.process.pid)
        try:
            while line := await reader.readline():
                self._fan_out(line)
        finally:
            self._writer.close()
            self._writer = None
        raise RuntimeError("the feed closed its connection")

    def _fan_out(self, raw: bytes) -> None:
        try:
            price = protocol.Price.model_validate(json.loads(raw))
        except ValueError:
            return
        workers = self.subscribers.get((price.source, price.instrument))
        if workers:
            line = protocol.encode(price)
            for worker in workers.values():
                worker.send_encoded(line)

    async def _stop_process(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()
