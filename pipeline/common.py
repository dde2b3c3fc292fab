"""Helpers every stage shares: logging, atomic writes, JSON and CSV reading, the stage's main().

No torch or fastai here, so that the light stages start in a moment; what training stages share is in `torch_setup`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import select
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import psutil

# atomic_path's scratch folders: `.<target name>.<owner pid>.<random>.partial`, next to the target.
SCRATCH_SUFFIX = ".partial"
OLD_SUFFIX = ".old"  # inside a scratch folder: the previous directory, moved aside for the swap


def log(stage: str, message: str) -> None:
    """One readable line on stderr, prefixed by the stage name (DVC shows stderr as it runs)."""
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


def banner(stage: str, message: str) -> None:
    """A line meant to be noticed among the rest (e.g. 'this run uses SYNTHETIC data')."""
    bar = "=" * min(100, len(message) + 4)
    print(f"[{stage}] {bar}\n[{stage}]   {message}\n[{stage}] {bar}", file=sys.stderr, flush=True)


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory) that replaces `target` in one rename on success.

    A killed writer leaves the previous `target` in place (or, between a directory swap's two renames, in its
    scratch folder, from where remove_stale_scratch puts it back). A full disk is a NoSpaceError naming `target`.
    """
    target = Path(target)
    with no_space_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=SCRATCH_SUFFIX, dir=target.parent))
        staging = tmp / target.name
        try:
            yield staging
            if not staging.exists():
                raise FileNotFoundError(f"{staging}: the writer produced nothing")
            if target.is_dir() and not target.is_symlink():
                # os.replace cannot replace a non-empty directory: move the old one aside into the scratch folder,
                # where remove_stale_scratch finds it again if this process dies before the second rename.
                os.replace(target, tmp / (target.name + OLD_SUFFIX))
            os.replace(staging, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_scratch(target: Path | str) -> None:
    """Remove the scratch folders of `target` that a killed writer left (its pid, in the name, is gone).

    A running owner's folder is left alone; one killed mid-swap held the only copy of `target`: it is put back first.
    """
    target = Path(target)
    owned = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[a-z0-9_]+{re.escape(SCRATCH_SUFFIX)}")
    for sibling in target.parent.iterdir():
        owner = owned.fullmatch(sibling.name)
        if owner and sibling.is_dir() and not psutil.pid_exists(int(owner.group(1))):
            moved_aside = sibling / (target.name + OLD_SUFFIX)
            if moved_aside.is_dir() and not target.exists():
                os.replace(moved_aside, target)
            shutil.rmtree(sibling, ignore_errors=True)


class NoSpaceError(Exception):
    """A write that filled its disk (ENOSPC): one line naming the path, the space, and how to get old outputs back."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # the one line, even after fastai's callbacks prefixed args[0]
        return self.message


@contextmanager
def no_space_error(path: Path | str) -> Iterator[None]:
    """Turn ENOSPC inside the block into a NoSpaceError naming `path` and its free space.

    Under `dvc repro` (DVC_STAGE is set) DVC removed the stage's cached outputs before it ran: say how to get them back.
    torch.save to a path reports a full disk as an opaque RuntimeError: callers save through a Python file.
    """
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(next(p for p in [*Path(path).parents, Path(".")] if p.exists())).free
        stage = os.environ.get("DVC_STAGE")
        restore = f"`dvc checkout {stage}` brings back the outputs DVC removed before the run" if stage else (
            "the previous outputs are unchanged")
        raise NoSpaceError(f"{path}: no space left on device ({free / 2**20:.1f} MiB free there); free some space "
                           f"and run again; {restore}") from None


def json_text(payload: Any) -> str:
    """`payload` as the indented JSON that metrics files hold (numpy scalars and arrays, Paths included)."""
    return json.dumps(payload, indent=2, default=_json_default) + "\n"


def write_json(path: Path | str, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(payload))


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file, read in 1 MiB blocks (the competition zip is about 1 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_csv(path: Path | str, error: type[Exception], fix: str, unique: str | None = None,
             name: str | None = None) -> pd.DataFrame:
    """The CSV's cells as the strings written there; a file that is empty, binary or ragged, or a value repeated in
    column `unique`, is `error`: one line naming the file (as `name`, default its path) and `fix`."""
    name = name or path
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        reason = (str(err).strip().splitlines() or [""])[0][:100]
        raise error(f"{name}: not a readable CSV ({type(err).__name__}: {reason}); {fix}") from None
    if not isinstance(table.index, pd.RangeIndex):
        # pandas reads rows one field longer than the header as having an index column: ragged, not an index.
        raise error(f"{name}: not a readable CSV (rows have more fields than the header); {fix}")
    repeated = table[unique][table[unique].duplicated()] if unique in table.columns else []
    if len(repeated):
        raise error(f"{name}: {unique} {repeated.iloc[0]!r} appears more than once; {fix}")
    return table


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the stage is, so that its clean-ups run as they do for a Ctrl-C."""


def stage_main(stage: str, *errors: type[Exception]) -> Callable:
    """Decorate a stage's main(): its `errors` and a full disk end it with their one line, an interrupt (Ctrl-C,
    SIGTERM) with one line after the `finally` blocks ran; a bug raises as itself. On Linux the stage gets SIGTERM
    when its parent dies (PR_SET_PDEATHSIG), or the shell's parent when its parent is a shell (see
    `_sigterm_when_the_shells_parent_exits`): a killed `dvc repro` would otherwise leave it running as an orphan."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            previous = signal.signal(signal.SIGTERM, _raise_interrupted)
            prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else lambda *_: None
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            stop_watching = _sigterm_when_the_shells_parent_exits()
            try:
                return main(*args, **kwargs)
            except (NoSpaceError, *errors) as err:
                raise SystemExit(f"{stage}: {err}") from None
            except KeyboardInterrupt as err:
                name = err.args[0] if isinstance(err, Interrupted) else "SIGINT"
                log(stage, f"interrupted ({name}); the previous outputs are kept, run the stage again to finish")
                raise SystemExit(128 + signal.Signals[name]) from None
            finally:
                stop_watching()
                signal.signal(signal.SIGTERM, previous)
                prctl(PR_SET_PDEATHSIG, 0)

        return run

    return decorate


SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish"}


def _sigterm_when_the_shells_parent_exits() -> Callable[[], None]:
    """dvc runs a stage's cmd as `$SHELL -c cmd` (/bin/sh where SHELL is unset, as under CI runners), and dash,
    Debian's /bin/sh, forks the command instead of exec'ing it: the stage's parent is then that shell, which outlives
    a killed dvc, so PR_SET_PDEATHSIG never fires. Where the parent is a shell, a thread waits on a pidfd of the
    shell's parent and sends SIGTERM to the main thread (the one a blocking call must be interrupted in) when it
    exits. Returns the function that stops the thread."""
    parent = psutil.Process().parent()
    watched = parent.parent() if parent is not None and parent.name() in SHELLS else None
    if watched is None or watched.pid <= 1 or not hasattr(os, "pidfd_open"):
        return lambda: None
    try:
        watched_fd = os.pidfd_open(watched.pid)
    except OSError:  # it exited meanwhile, or a kernel older than 5.3: PR_SET_PDEATHSIG alone, as before
        return lambda: None
    wake_read, wake_write = os.pipe()
    main_thread = threading.main_thread().ident

    def wait() -> None:
        ready, _, _ = select.select([watched_fd, wake_read], [], [])
        if watched_fd in ready and wake_read not in ready:
            signal.pthread_kill(main_thread, signal.SIGTERM)

    watcher = threading.Thread(target=wait, name="watch-dvc", daemon=True)
    watcher.start()

    def stop() -> None:
        os.write(wake_write, b"\0")
        watcher.join()
        for fd in (watched_fd, wake_read, wake_write):
            os.close(fd)

    return stop


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)
