"""Report files written safely: created exclusively, replaced atomically, never half-written.

A report path (``--kld-json``, ``--kld-markdown``, ``--kld-chart``, the command line's
``--json``) may sit in a directory other users can write (``/tmp``, a shared CI workspace). So:

- the temporary file is created in the target's own directory with ``O_CREAT | O_EXCL |
  O_NOFOLLOW`` under a random name: a link planted there (at any name) is never followed, and no
  existing file is opened for writing;
- it is written, flushed to disk, then ``os.replace``-d onto the target: a reader sees the old
  file or the new one, never a truncated one; on any error (full or read-only disk, a kill) the
  temporary is removed and the old file stays as it was;
- a target that is itself a symbolic link is replaced by the new file, not written through: the
  file the link pointed to is never touched;
- the new file gets the old file's permission bits, or 0644 for a new one.

Appending (GitHub's ``$GITHUB_STEP_SUMMARY`` collects the summaries of several steps) reads the
old content and replaces the file with old + new in the same way.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat


def write_bytes(path: str | os.PathLike, data: bytes, *, append: bool = False) -> None:
    """Write ``data`` to ``path`` as described in the module docstring (OSError on failure)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    directory = os.path.dirname(path)
    mode, old = _old_file(path, append)
    if append and old:
        data = old + data
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:  # a name taken (or planted): draw another
            continue
    else:
        raise OSError(errno.EEXIST, "could not create a temporary file", directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path: str | os.PathLike, text: str, *, append: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), append=append)


def _old_file(path: str, append: bool) -> tuple[int, bytes]:
    """(permission bits for the new file, old content when appending) of a regular file at
    ``path``; a link or anything else there is not read."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0o644, b""
    if not stat.S_ISREG(st.st_mode):
        return 0o644, b""
    old = b""
    if append:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            old = f.read()
    return stat.S_IMODE(st.st_mode), old
