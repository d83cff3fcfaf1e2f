"""One writer per run directory: an exclusive lock taken before the first write and released on exit.

    lock = RunLock.acquire(run_dir)      # ConfigError naming the holder when another live run has the directory
    ...                                  # train, save checkpoints
    lock.release()                       # also at interpreter exit, if the run never got there

``<run_dir>/lock`` is created with O_CREAT | O_EXCL (atomic on local disks and NFS) and says who holds it: host,
pid, that process's start time, the command and when it took the lock. While held, a thread touches it every
``HEARTBEAT_S`` seconds. A lock is stale, and is taken over with a warning, when its holder
  - ran on this host and is gone (no such pid, or the pid now names a process started at another time), or
  - ran on another host (whose processes cannot be seen from here) and has not touched the lock for ``STALE_S``
    seconds: a job killed with its node, restarted elsewhere.
Only one contender may take over: it first creates ``lock.takeover`` exclusively, checks again that the lock is
stale, moves it aside (``lock.stale-*``, kept for the record) and creates its own. Multi-host: process 0 holds
the lock, and every process learns whether it got it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama_jax import cli
from llama_jax.errors import ConfigError

LOCK_FILE = "lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # a holder on another host that has not touched the lock for this long is gone


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux /proc), None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return start_ticks is None or _start_ticks(pid) in (None, start_ticks)


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):  # gone, or being written at this very moment
        return None


def describe(holder: dict | None) -> str:
    if holder is None:
        return "a run whose lock file is unreadable"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, running since {holder.get('started')} "
            f"(`{holder.get('command')}`)")


def stale_because(path: str, holder: dict | None, now: float | None = None) -> str | None:
    """Why the lock at ``path`` no longer protects a live run, or None if it may."""
    now = time.time() if now is None else now
    try:
        idle = now - os.path.getmtime(path)
    except OSError:
        return "it is gone"
    if holder is None:
        return f"it is unreadable and untouched for {idle:.0f} s" if idle > STALE_S else None
    if holder.get("host") == socket.gethostname():
        if not _alive(int(holder.get("pid", -1)), holder.get("start_ticks")):
            return f"process {holder.get('pid')} on this host has exited"
        return None
    if idle > STALE_S:
        return f"its holder on host {holder.get('host')} has not touched it for {idle:.0f} s (> {STALE_S:.0f} s)"
    return None


class RunLock:
    """The lock of one run directory, held by this process (see the module docstring)."""

    def __init__(self, path: str | None, token: str | None):
        self.path, self.token = path, token  # None on processes other than 0: they hold nothing
        self._stop = threading.Event()
        if path is not None:
            threading.Thread(target=self._heartbeat, name="llama_jax-run-lock", daemon=True).start()
            atexit.register(self.release)

    @classmethod
    def acquire(cls, run_dir: str) -> RunLock:
        """Takes ``<run_dir>/lock`` (process 0; every process calls it). ConfigError if another run holds it."""
        error = None
        lock = None
        if jax.process_index() == 0:
            try:
                lock = cls._take(os.path.join(os.path.abspath(run_dir), LOCK_FILE))
            except ConfigError as e:
                error = e
        if jax.process_count() > 1:
            failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
            if failed and error is None:
                raise ConfigError(f"process 0 could not lock {run_dir} (its error names the holder)")
        if error is not None:
            raise error
        return lock if lock is not None else cls(None, None)

    @classmethod
    def _take(cls, path: str) -> RunLock:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        token = uuid.uuid4().hex
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500], "token": token}
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                why = stale_because(path, holder)
                if why is None:
                    raise ConfigError(f"{os.path.dirname(path)} is in use by another run: {describe(holder)}. Wait "
                                      f"for it to end or stop it, or use another run_dir; if you are sure it is "
                                      f"gone, delete {path}") from None
                cls._take_over(path, holder, why)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return cls(path, token)
        raise ConfigError(f"could not take {path}: other runs keep taking it (is something restarting runs?)")

    @staticmethod
    def _take_over(path: str, holder: dict | None, why: str) -> None:
        """Moves a stale lock aside, unless another contender is doing the same right now."""
        guard = f"{path}.takeover"
        with contextlib.suppress(OSError):  # a contender that died mid-takeover left its guard
            if time.time() - os.path.getmtime(guard) > STALE_S:
                os.remove(guard)
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            time.sleep(0.5)  # another contender is taking over; its new lock will be seen as live
            return
        os.close(fd)
        try:
            if stale_because(path, _read(path)) is not None and os.path.exists(path):
                os.rename(path, f"{path}.stale-{uuid.uuid4().hex[:8]}")
                cli.log(f"warning: taking over the lock of {describe(holder)}: {why}")
        finally:
            os.remove(guard)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Removes the lock if it is still this process's (idempotent)."""
        self._stop.set()
        if self.path is None:
            return
        atexit.unregister(self.release)
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.path = None
