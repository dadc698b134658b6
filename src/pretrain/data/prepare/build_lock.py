"""One builder per ``data_dir``: two nodes' first processes under ``fit`` on a shared filesystem, a sweep, or
``prepare`` beside ``fit`` would otherwise clear each other's work.

The lock is a file in ``data_dir``, created atomically (``O_CREAT | O_EXCL``, which shared filesystems honour),
holding its builder's host, process id and start time. A thread touches it while the build runs; it is removed
at the end, after a failure, Ctrl-C or SIGTERM. Another builder waits for it, then looks again: a matching build
is served, anything else is built. A lock whose process is gone (same host) or that has not been touched for
``STALE_SECONDS`` (any host) is taken over, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from pretrain.data.prepare.ranks import Ranks
from pretrain.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".pretrain-build.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # ten missed heartbeats: the builder is gone, or its host is
POLL_SECONDS = 1.0
WAIT_VARIABLE = "PRETRAIN_BUILD_WAIT"  # seconds a builder waits for another; unset: as long as it takes
_HELD_HERE: set[str] = set()  # the locks this process's threads hold, by token


class BuildTerminated(SystemExit):
    """SIGTERM during a build: the process ends as SIGTERM would end it (status 143), after cleaning up."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def wait_limit() -> float | None:
    text = os.environ.get(WAIT_VARIABLE, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise UserError(f"{WAIT_VARIABLE}={text!r} is not a number of seconds; unset it to wait as long as it takes.")
    return seconds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} (since {holder.get('started', '?')})"


class BuildLock:
    """The lock of one ``data_dir``: ``acquire`` waits for any other builder, ``release`` lets the next one in."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self.host = socket.gethostname()
        self.token = secrets.token_hex(8)  # tells this lock from a later one at the same path
        self._stop_heartbeat: threading.Event | None = None
        self._heartbeat: threading.Thread | None = None
        self._previous_sigterm: Any = None

    def acquire(self) -> None:
        limit = wait_limit()
        deadline = None if limit is None else time.monotonic() + limit
        waiting_for = None
        while not (created := self._create()):
            found = self._read()
            if found is None:
                continue  # released meanwhile: try again at once
            holder, age, text = found
            if (why := self._stale(holder, age)) is not None:
                log.warning(
                    "Taking over the build of %s: the lock of %s is stale (%s).",
                    self.path.parent,
                    _describe(holder),
                    why,
                )
                self._break(text)
                continue
            if waiting_for is None and holder:
                waiting_for = _describe(holder)
                log.info("%s is being built by %s: waiting for that build to end.", self.path.parent, waiting_for)
            if deadline is not None and time.monotonic() > deadline:
                raise UserError(
                    f"{self.path.parent} was still being built by {waiting_for or 'another process'} after waiting "
                    f"{limit:g} s ({WAIT_VARIABLE}): wait longer, or remove {self.path} if no such build is running."
                )
            time.sleep(POLL_SECONDS)
        if created == "read-only":
            log.info("%s cannot be written here: its build is read without the build lock.", self.path.parent)
            return
        self._start_heartbeat()
        self._end_cleanly_on_sigterm()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if this process holds it (safe to call when it does not)."""
        if self._stop_heartbeat is None:
            return
        self._stop_heartbeat.set()
        self._heartbeat.join()
        self._stop_heartbeat = self._heartbeat = None
        found = self._read()
        if found is not None and found[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)
        else:
            log.warning("The lock %s was taken over by another builder while this one ran.", self.path)
        _HELD_HERE.discard(self.token)
        if self._previous_sigterm is not None:  # last: a SIGTERM until here still finds the lock removed
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _create(self) -> bool | str:
        """True once this process holds the lock; False while another does; ``"read-only"`` where ``data_dir``
        cannot be written (a shared build mounted read-only: served as it is, never built there)."""
        holder = {
            "host": self.host,
            "pid": os.getpid(),
            "token": self.token,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _HELD_HERE.add(self.token)  # before the file exists: another thread here must never find it unclaimed
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _HELD_HERE.discard(self.token)
            return False
        except OSError as error:
            _HELD_HERE.discard(self.token)
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return "read-only"
            raise
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps(holder) + "\n")
        return True

    def _read(self) -> tuple[dict[str, Any], float, str] | None:
        """The holder (empty while its lock is being written), the seconds since its last heartbeat, and the
        lock's text; None where there is no lock."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), age, text

    def _stale(self, holder: dict[str, Any], age: float) -> str | None:
        """Why the lock's builder is gone, or None while it may still be building."""
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int):
            if pid == os.getpid() and holder.get("token") not in _HELD_HERE:
                return "left by an earlier process with this process id"  # a restarted container, say
            if not _alive(pid):
                return "that process has ended"
        if age > STALE_SECONDS:
            return f"no heartbeat for {age / 60:.0f} minutes"
        return None

    def _break(self, seen: str) -> None:
        """Remove the stale lock whose text is ``seen``, unless another waiter replaced it meanwhile by a fresh
        one: that one is put back (the rename keeps it whole, even while its owner still writes it)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another waiter took it over first
        if aside.read_text() != seen:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()

    def _start_heartbeat(self) -> None:
        stop = self._stop_heartbeat = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                with contextlib.suppress(OSError):  # taken over, or the filesystem away for a moment
                    os.utime(self.path)

        self._heartbeat = threading.Thread(target=beat, name="build-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _end_cleanly_on_sigterm(self) -> None:
        """SIGTERM would end the process at once and leave the lock behind: it raises instead, so the lock is
        removed on the way out. Only where SIGTERM has its default action (nobody else handles it) and in the
        main thread (the only one that can set handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise BuildTerminated()


@contextlib.contextmanager
def one_builder(root: Path, ranks: Ranks) -> Iterator[None]:
    """Hold ``root``'s lock around a build: rank 0 takes it for its whole group, the other ranks follow rank 0's
    decisions inside. ``root`` is made if needed (the lock lives there), and removed again if the build ends
    before writing anything in it (a source that does not exist): a mistake leaves no empty folder behind."""
    lock, existed = BuildLock(root), root.exists()

    def acquire() -> None:
        root.mkdir(parents=True, exist_ok=True)
        lock.acquire()

    try:
        ranks.on_first(acquire)
        yield
    except BuildTerminated:
        log.warning("SIGTERM: stopped building %s; nothing half-built is served, and the next run builds it.", root)
        raise
    finally:
        lock.release()
        if ranks.first and not existed:
            with contextlib.suppress(OSError):  # not empty: a build wrote there
                root.rmdir()
