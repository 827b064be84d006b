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
old content and replaces the file with old + new in the same way. A target that exists and is not
a regular file (``/dev/stdout``, ``/dev/null``, a FIFO, a terminal) is written through, never
replaced; a directory is refused (:func:`check_target`, before a run starts).

Reading what may come from elsewhere (a cache or a baseline handed over, a lock's owner file, a
corpus): :func:`read_regular` reads a regular file only (a FIFO or device is refused before it is
opened for reading, so nothing hangs or reads without bound) up to a size limit, and
:func:`read_json` / :func:`parse_json` parse JSON with limits on nesting depth, integer digits and
size, without NaN or infinities. Each failure is :class:`UnreadableFile`, whose message is the
reason alone (the caller names the file and what to do).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat

from .errors import KldError

MAX_JSON_BYTES = 256 << 20  # a baseline of ~60 million positions; a manifest is a few kB
MAX_JSON_DEPTH = 64  # our documents nest 5 levels deep
MAX_INT_DIGITS = 40  # 128-bit integers; a count or a size needs far fewer


class UnreadableFile(KldError):
    """A file that is not a regular file, too large, or not JSON within the limits; the message
    is the reason only."""


def write_bytes(path: str | os.PathLike, data: bytes, *, append: bool = False) -> None:
    """Write ``data`` to ``path`` as described in the module docstring (OSError on failure)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if _write_through(path, data, append):  # /dev/stdout, /dev/null, a FIFO: never replace the node
        return
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


def _write_through(path: str, data: bytes, append: bool) -> bool:
    """Write ``data`` into the FIFO or character device at ``path`` (``/dev/stdout``,
    ``/dev/null``) and return True; False for anything else (a new or regular file, replaced
    atomically). A link to such a node is followed only where the user named a path under
    ``/dev`` or ``/proc``: a link planted elsewhere is replaced, as ever. A block device is refused.
    A FIFO nobody reads is an error (ENXIO), not a hang."""
    try:
        st, lst = os.stat(path), os.lstat(path)
    except OSError:
        return False
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return False
    if stat.S_ISLNK(lst.st_mode) and not path.startswith(("/dev/", "/proc/")):
        return False
    if not (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        raise OSError(errno.EINVAL, f"{_kind(st.st_mode)} is never written", path)
    flags = os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (os.O_APPEND if append else 0)
    fd = os.open(path, flags)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def check_target(path: str | os.PathLike) -> str | None:
    """Why a report could not be written at ``path`` (checked before a run starts), or None: a
    directory, a missing parent directory, a parent that is not a directory."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        return "is a directory; give a file's path"
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        return f"directory {parent} does not exist"
    return None


def read_regular(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of the regular file ``path`` (links followed), at most ``limit`` of them.
    FileNotFoundError when it does not exist; :class:`UnreadableFile` for a FIFO, a device, a
    directory or a larger file, and for a read that fails."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UnreadableFile(f"cannot be opened ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"not a regular file ({_kind(st.st_mode)})")
        if st.st_size > limit:
            raise UnreadableFile(f"{st.st_size} bytes, more than the {limit} read")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise UnreadableFile(f"cannot be read ({e.strerror or e})") from None
    if len(data) > limit:
        raise UnreadableFile(f"more than the {limit} bytes read")
    return data


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a file"


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES):
    """:func:`parse_json` of the regular file ``path`` (:func:`read_regular`), UTF-8."""
    data = read_regular(path, limit)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableFile(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_json(text)


_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def parse_json(text: str):
    """``json.loads(text)`` within limits: nesting at most :data:`MAX_JSON_DEPTH`, integers of at
    most :data:`MAX_INT_DIGITS` digits, floats finite, no NaN or Infinity; :class:`UnreadableFile`
    (one line) otherwise."""
    if len(text) > MAX_JSON_BYTES:
        raise UnreadableFile(f"more than {MAX_JSON_BYTES} characters of JSON")
    depth = max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise UnreadableFile(f"JSON nested {depth} levels deep, more than {MAX_JSON_DEPTH}")
    try:
        return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise UnreadableFile(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise UnreadableFile(f"not valid JSON ({e})") from None


def max_depth(text: str) -> int:
    """How deep the arrays and objects of the JSON ``text`` nest (brackets inside strings aside)."""
    import numpy as np

    bare = _STRINGS.sub('""', text).encode("utf-8", "replace")
    b = np.frombuffer(bare, dtype=np.uint8)
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int32) - np.isin(b, (ord("]"), ord("}"))).astype(np.int32)
    return int(np.cumsum(step).max()) if step.size else 0


def _int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(s.lstrip('-'))} digits, more than {MAX_INT_DIGITS}")
    return int(s)


def _float(s: str) -> float:
    v = float(s)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"the number {s[:20]} is out of range")
    return v


def _constant(s: str):
    raise ValueError(f"{s} is not a number JSON allows")


def control_text(obj, where: str = "") -> str | None:
    """Where in the parsed JSON ``obj`` a string (or a key) first holds a control character (an
    ANSI escape for a terminal, a newline in a one-line name), as a dotted path; None if nowhere."""
    if isinstance(obj, str):
        return (where or "a string") if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in obj) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        here = f"{where}.{k}" if where else str(k)
        hit = (control_text(k, here) if isinstance(k, str) else None) or control_text(v, here)
        if hit:
            return hit
    return None
