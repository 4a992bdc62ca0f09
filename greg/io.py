"""Atomic file output: write to a temp file in the same directory, fsync, then rename.

Snakemake on SLURM kills and requeues jobs; a half-written file must never look like an output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io as _io
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml


@contextlib.contextmanager
def _naming(path: Path, tmp: str | None = None) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file (a failed write/flush/fsync: "No space left on device")
    or only our temp file, naming the target ``path`` instead (``[Errno 28] No space left on device:
    '<path>'``); errno, and so the subclass, is kept. Errors naming another file pass unchanged."""
    try:
        yield
    except OSError as e:
        name = None if e.filename is None else os.fspath(e.filename)
        ours = (
            name is None
            or name == tmp
            or (
                tmp is None
                and Path(name).parent == path.parent
                and Path(name).name.startswith(f".{path.name}.")
            )
        )
        if not ours or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file next to ``path``; on clean exit fsync it and rename it onto ``path``."""
    with atomic_path(path) as tmp, open(tmp, mode, opener=_nofollow_opener, **kwargs) as f:
        yield f


def _nofollow_opener(name: str, flags: int) -> int:
    return _open_nofollow(Path(name), flags)


def open_nofollow(path: str | os.PathLike, mode: str = "r", **kwargs: Any) -> IO:
    """``open`` that refuses a symlink at ``path`` (one line naming it) instead of following it: for files
    written in place, such as a run's appended log."""
    return open(path, mode, opener=_nofollow_opener, **kwargs)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for libraries that want a file name; rename on success."""
    path = Path(path)
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # The project's own mark, host and pid in the name: cleanup removes only temp files of dead writers.
        # mkstemp creates the file with O_EXCL: an existing name (a planted symlink) is never opened.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP_MARK}{_host()}-{os.getpid()}-",
                                   suffix=".tmp" + path.suffix)
        try:
            # mkstemp creates 0600; an output must get the mode any other file would (a group reads results).
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
    try:
        with _naming(path, tmp):
            yield Path(tmp)
            # the writer reopened the temp name: if it became a symlink meanwhile, neither sync nor publish it
            fd = _open_nofollow(Path(tmp), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    # Serialized in memory first: torch's zip writer turns a failed write (ENOSPC) into a RuntimeError from
    # inline_container.cc; a plain write keeps the OSError and its errno ("[Errno 28] ... state.pt", exit 1).
    buf = _io.BytesIO()
    import torch  # on use: table/figure jobs read CSV and JSON only and skip torch's ~2.5 s import

    torch.save(obj, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getbuffer())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers (no code runs from the file)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated / corrupted / pickled code
        # torch's weights-only message spans many lines (advice about weights_only=False): keep the first
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise RuntimeError(f"cannot load {path} as a weights-only checkpoint: {first}") from e


# Limits of every YAML greg reads (configs, presets, tables): nesting depth (PyYAML's composer recurses, and
# 20,000 nested `[` end in a RecursionError) and the size of the document with its aliases expanded (an
# "alias bomb" of a few lines expands to billions of nodes when the value is copied, dumped or printed).
# Greg's own configs stay far below both (depth < 10, < 10,000 nodes).
YAML_MAX_DEPTH = 100
YAML_MAX_NODES = 1_000_000


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``; users write ``1e-4``),
    refuses a key written twice in one mapping (PyYAML keeps the last silently), and refuses a document
    nested deeper than :data:`YAML_MAX_DEPTH` or larger than :data:`YAML_MAX_NODES` once aliases are
    expanded."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > YAML_MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {YAML_MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        _check_expanded_size(node)
        return node


def _check_expanded_size(root: yaml.Node) -> None:
    """Nodes of ``root`` with every alias expanded (shared nodes counted at each use), without expanding."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # post-order, iterative
        node, done = stack.pop()
        if not done and id(node) in sizes:
            continue
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if not done:
            sizes[id(node)] = -1  # in progress: seen again before done = an alias to an ancestor
            stack.append((node, True))
            for c in children:
                if sizes.get(id(c)) == -1:
                    raise yaml.composer.ComposerError(None, None, "an alias refers to its own ancestor",
                                                      c.start_mark)
                if id(c) not in sizes:
                    stack.append((c, False))
            continue
        total = 1 + sum(sizes[id(c)] for c in children)
        if total > YAML_MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"more than {YAML_MAX_NODES:,} values once its aliases (*name) are expanded",
                node.start_mark)
        sizes[id(node)] = total


def _unique_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overrides is legitimate
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        except TypeError:  # unhashable key: SafeLoader reports it itself
            pass
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def yaml_load(stream: Any) -> Any:
    """Parse YAML safely (no object construction), with scientific-notation floats."""
    return yaml.load(stream, Loader=_Loader)


# ------------------------------------------------------------------------------ temp files and run locks
_TMP_MARK = ".greg-tmp-"
# .<target><mark><host>-<pid>-<random>.tmp[<suffix>], as atomic_path names them
_TMP_RE = re.compile(r"^\.(?P<target>.+)" + re.escape(_TMP_MARK) + r"(?P<host>\w*)-(?P<pid>\d+)-[a-z0-9_]+\.tmp")
LOCK_NAME = ".greg.lock"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0])[:40]


def _umask() -> int:
    try:  # Linux: read without changing it (os.umask() would have to set it, racing other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31  # exists, owned by another user
    return True


def stale_temp_files(directory: str | os.PathLike, *, locked: bool = False) -> list[Path]:
    """greg temp files in ``directory`` whose writer is gone: regular files with :func:`atomic_path`'s name
    pattern whose pid is not a live process on this host. Files of other hosts count as stale only when the
    caller holds the directory's :func:`dir_lock` (every greg writer of the directory takes it). Anything
    else (a user's ``.notes.tmp``, a directory, a link) is never listed."""
    out = []
    directory = Path(directory)
    if not directory.is_dir():
        return out
    host, me = _host(), os.getpid()
    for p in sorted(directory.iterdir()):
        m = _TMP_RE.match(p.name)
        if not m or p.is_symlink() or not p.is_file():
            continue
        pid = int(m["pid"])
        if m["host"] == host:
            if pid == me or _pid_alive(pid):
                continue
        elif not locked:
            continue
        out.append(p)
    return out


def remove_stale_temp_files(directory: str | os.PathLike, *, locked: bool = False) -> list[Path]:
    """Delete :func:`stale_temp_files` (litter of a SIGKILLed write); returns what was removed."""
    gone = stale_temp_files(directory, locked=locked)
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


class LockedError(OSError):
    """Another process holds the directory's lock (exit 1: an environment condition, retry later)."""

    exit_code = 1


class NotARunDirError(ValueError):
    """``--out`` is empty, a symlinked lock, or a non-empty directory greg did not make (exit 2)."""

    exit_code = 2


# Filesystems without flock (Lustre mounted noflock: ENOSYS; some NFS setups: ENOLCK/EOPNOTSUPP) get a lock
# file made with O_EXCL instead; GREG_LOCK=file forces it (BeeGFS without global locks: flock is node-local).
_NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)
EXCL_LOCK_NAME = ".greg.lock.owner"


def _open_nofollow(path: Path, flags: int, mode: int = 0o666) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP and path.is_symlink():
            raise NotARunDirError(f"{path} is a symbolic link: greg never writes through one (remove it)") from None
        raise


def _check_run_dir(directory: Path, what: str) -> None:
    # greg's marker is its lock file: a non-empty directory without it is someone else's (the working
    # directory, a data folder) and its config.yaml / metrics.jsonl must not be overwritten.
    if not directory.is_dir() or os.path.lexists(directory / LOCK_NAME):
        return
    if next(directory.iterdir(), None) is not None:
        raise NotARunDirError(f"{what} {directory} is not empty and was not made by greg (no {LOCK_NAME}): use a "
                              "new or empty directory")


#: Descriptors of the flocks this process holds (:func:`dir_lock`): a forked child closes its copies at once,
#: so DataLoader workers never keep a run directory locked after its holder died (a SIGKILL, or a SIGTERM
#: outside the training loop); otherwise an immediate retry finds it "in use" for the seconds they take to
#: notice, and exits 2.
_HELD_LOCK_FDS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in list(_HELD_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)  # the child's reference only: the parent's flock stays
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


@contextlib.contextmanager
def dir_lock(directory: str | os.PathLike, what: str = "the directory") -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``directory/.greg.lock`` (created if needed, never deleted) for the
    block. The kernel releases it when the process exits, even on SIGKILL. A held lock raises
    :class:`LockedError` at once, naming the holder's pid (written into the file by the holder).

    The lock file is greg's mark on the directory: a non-empty directory without it is refused, and neither
    it nor the fallback lock file is ever followed when it is a symlink. Where ``flock`` is not supported,
    :func:`_excl_lock` takes over (one warning line)."""
    directory = Path(directory)
    if not str(directory).strip():
        raise NotARunDirError(f"{what} is empty")
    path = directory / LOCK_NAME
    with _naming(path):
        _check_run_dir(directory, what)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = _open_nofollow(path, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            # read-only directory: lock an existing file read-only; the first real write then names the
            # output that cannot be written
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # no lock file and none can be made: we cannot write here either, so there is nothing to
            # protect (a finished run on a read-only disk)
            fd = _open_nofollow(path, os.O_RDONLY) if path.is_file() else None
    if fd is None:
        yield path
        return
    try:
        no_flock = None
        try:
            if os.environ.get("GREG_LOCK", "flock") == "file":
                raise OSError(errno.ENOSYS, "GREG_LOCK=file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _NO_FLOCK:
                no_flock = e
            elif e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            else:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown pid"
                raise LockedError(f"{what} {directory} is in use by another process ({holder}): wait for it "
                                  "to finish or use another directory") from None
        if no_flock is not None:
            with _excl_lock(directory, what, no_flock):
                yield path
            return
        with contextlib.suppress(OSError):  # a full or read-only disk: the lock holds, the holder is unnamed
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder().encode(), 0)
        _HELD_LOCK_FDS.add(fd)
        yield path
    finally:
        _HELD_LOCK_FDS.discard(fd)
        # Unlock before closing: a child forked without the at-fork hook (os.fork by a C library) may still
        # share the open file description, and would keep the flock after our close.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}\n"


@contextlib.contextmanager
def _excl_lock(directory: Path, what: str, why: OSError) -> Iterator[None]:
    """The lock without flock: ``directory/.greg.lock.owner``, created with ``O_EXCL`` (atomic on local
    disks, NFSv3+, Lustre and BeeGFS), holding host and pid, deleted on exit. Limits (docs/RELIABILITY.md):
    a holder killed with SIGKILL (or its node failing) leaves the file behind; on the same host a dead pid
    is recognised and the file replaced, a file of another host is refused until deleted by hand."""
    path = directory / EXCL_LOCK_NAME
    print(f"greg: WARNING: {directory}: flock unavailable ({why.strerror or why}); locking with {path} "
          "instead (a process killed on another host leaves it behind: delete it by hand)", file=sys.stderr)
    me = _holder()
    for _ in range(2):
        try:
            fd = _open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            if path.is_symlink():
                raise NotARunDirError(f"{path} is a symbolic link: greg never writes through one (remove it)"
                                      ) from None
            try:
                holder = path.read_text(encoding="utf-8", errors="replace").strip()
            except FileNotFoundError:  # released in between
                continue
            m = re.fullmatch(r"pid (\d+) on (\S+)", holder)
            if m and m[2] == socket.gethostname() and not _pid_alive(int(m[1])):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # its holder on this host is gone
                continue
            raise LockedError(f"{what} {directory} is in use by another process ({holder or 'unknown pid'}; "
                              f"lock file {path}): wait for it to finish or use another directory") from None
        try:
            os.write(fd, me.encode())
        finally:
            os.close(fd)
        break
    else:
        raise LockedError(f"{what} {directory}: cannot take the lock file {path}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8") == me:
                path.unlink()
