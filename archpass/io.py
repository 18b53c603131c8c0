"""Every file archpass writes goes through here: output-path checks and atomic writes.

:func:`check_output` decides whether a path may receive a file before anything is
computed: a regular file (replaced) or a new path in a writable folder; the null device
(``/dev/null``) means "validate, write nothing"; anything else (a directory, a device, a
FIFO, a socket, an unwritable folder, a read-only filesystem) is an
:class:`~archpass.errors.OutputError`: one line, exit code 2.  :func:`write_atomically`
writes through a temporary folder next to the destination and renames into place, so a
reader never sees half a file and an interrupted write leaves the old file alone; an
``OSError`` while writing (disk full, permissions changed meanwhile) becomes an
OutputError too.  ``save_model`` (models), ``atomic_write_text`` (JSON, targets,
recipes, reports) and :func:`append_line` (the calibration cache) all use these.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from archpass.errors import OutputError

#: The path that means "validate only, write nothing" (a module constant so tests can
#: point it at a harmless stand-in instead of the real device).
NULL_DEVICE = os.devnull

_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def is_null(dest: str | os.PathLike) -> bool:
    """Whether ``dest`` is the null device (by identity, so ``/dev/../dev/null`` counts)."""
    try:
        return os.path.samefile(dest, NULL_DEVICE)
    except OSError:
        return False


def _writable_folder(folder: Path, dest: Path) -> None:
    """Raise unless files can be created in ``folder`` (or in its nearest existing ancestor,
    where the missing folders would be created)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"cannot write {dest}: {probe} is not a folder", "choose an output path inside a folder")
    try:
        readonly = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        readonly = False
    if readonly:
        raise OutputError(f"cannot write {dest}: {probe} is on a read-only filesystem",
                          "choose an output path on a writable filesystem")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {dest}: no permission to create files in {probe}",
                          "choose a folder you can write to")


def check_output(dest: str | os.PathLike, *, what: str = "output") -> Path | None:
    """The path to write, or None when ``dest`` is the null device (validate only).

    Raises OutputError when ``dest`` is not a regular file or a new path in a writable
    folder.  Cheap: call it before the work that produces the output."""
    dest = Path(dest)
    if is_null(dest):
        return None
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot use {dest} as the {what}: {exc.strerror}", "choose another output path") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"the {what} {dest} is a directory",
                              f"give a file path, e.g. {dest / 'model.onnx'}" if what == "output" else "give a file path")
        for test, kind in _KINDS:
            if test(st.st_mode):
                raise OutputError(f"the {what} {dest} is {kind}, not a regular file",
                                  f"write to a regular file or a new path (use {NULL_DEVICE} to validate without writing)")
    _writable_folder(dest.parent, dest)
    return dest


def check_output_dir(dest: str | os.PathLike, *, what: str = "output folder") -> Path:
    """A folder to write files into: an existing folder or a new path in a writable folder."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"the {what} {dest} exists and is not a folder", "give a folder path")
    _writable_folder(dest, dest)
    return dest


def _os_error(dest: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        return OutputError(f"cannot write {dest}: no space left on the device", "free some space or write elsewhere")
    return OutputError(f"cannot write {dest}: {reason}", "choose another output path")


@contextmanager
def _as_output_error(dest: Path) -> Iterator[None]:
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise _os_error(dest, exc) from None


def write_atomically(dest: str | os.PathLike, write: Callable[[Path], None]) -> Path | None:
    """Check ``dest`` (:func:`check_output`), call ``write(tmp)`` with a path in a temporary
    folder beside it, then rename everything ``write`` left in that folder into
    ``dest``'s folder (the file itself last, so its siblings, e.g. external data, are in
    place when it appears).  Returns ``dest``, or None for the null device (``write`` is
    still called on a throw-away folder, so the output is validated, not written)."""
    checked = check_output(dest)
    if checked is None:
        with tempfile.TemporaryDirectory(prefix="archpass-null-") as d:
            with _as_output_error(Path(dest)):
                write(Path(d) / "output")
        return None
    dest = checked
    with _as_output_error(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            tmp = tmpdir / dest.name
            write(tmp)
            umask = os.umask(0)
            os.umask(umask)
            for p in sorted(tmpdir.iterdir(), key=lambda p: p == tmp):
                os.chmod(p, 0o666 & ~umask)  # what a plain open() gives (mkstemp/mkdtemp make 0600/0700)
                os.replace(p, dest.parent / p.name)
        finally:
            for p in tmpdir.iterdir() if tmpdir.exists() else ():
                p.unlink()
            if tmpdir.exists():
                tmpdir.rmdir()
    return dest


def atomic_write_text(dest: str | os.PathLike, text: str) -> Path | None:
    """Write ``text`` atomically (see :func:`write_atomically`)."""
    return write_atomically(dest, lambda tmp: tmp.write_text(text))


def append_line(dest: str | os.PathLike, line: str) -> None:
    """Append one line and flush it to disk (a resumable cache: an interruption loses at
    most that line)."""
    dest = check_output(dest)
    if dest is None:
        return
    with _as_output_error(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
