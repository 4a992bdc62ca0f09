"""Checksummed, resumable downloads; extraction; the ``.complete`` marker; the checksum lock file.

Flow of :func:`download` for one dataset (all under ``<root>/<data_dir>/``):

1. ``.complete`` exists (and names the catalog's current files) -> nothing to do (no network). Otherwise the
   directory's ``.download.lock`` is taken (``flock``; a second process for the same directory, e.g.
   ``textures`` and ``textures_imagenet``, waits and then finds the first one's ``.complete``).
2. per resource: copy ``<mirror>/<file>`` (``--mirror DIR`` / ``$GREG_MIRROR``) when the mirror holds it,
   else fetch ``URL`` into ``<file>.part`` (HTTP Range resumes a previous partial file), check the
   length the server announced, verify the checksum (published md5/sha256, else the sha256 in
   ``<root>/checksums.lock.json``, else record one there and say so), only then rename to ``<file>``.
   A mismatch renames the file to ``<file>.corrupt`` and raises :class:`ChecksumError` with both digests.
   Alternative digests (``--checksums FILE``, ``--accept-checksum NAME=DIGEST``) are used only when given,
   each use is printed as a warning and recorded in ``.complete`` (``overrides``).
3. extract archives (tar/tar.gz with tarfile's ``data`` filter; zip with a path check), never through an
   existing symbolic link; count the images against the catalog (``DatasetSpec.archive_images``),
4. check the expected layout and the published digests of extracted files (``DatasetSpec.file_checksums``,
   e.g. the CIFAR batches), write ``.complete`` last: JSON with the verified digests (``files``) and the
   sha256 of every extracted file (``extracted``), which :func:`verify` re-checks even after the archive is
   deleted.

Files greg writes in a dataset directory (``<file>.part``, ``.download.lock``, extracted files) are opened
without following symbolic links: a link there is refused with one line, never written through.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import socket
import stat
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from greg.data.base import CorruptDataError, DatasetSpec, Resource, list_images, spec
from greg.io import atomic_write_json

__all__ = [
    "ChecksumError",
    "CorruptDataError",
    "DownloadError",
    "ManualDownloadRequired",
    "download",
    "verify",
]

URL_BASE_ENV = "GREG_DATA_URL_BASE"
#: A checksum file (``sha256sum``/``md5sum`` format) whose digests replace the published ones (``--checksums``).
CHECKSUMS_ENV = "GREG_DATA_CHECKSUMS"
#: A local directory holding files under their catalog file names (CI: the checkpoint folder beside the checkout); copied, then
#: verified against the same checksums as a download.
MIRROR_ENV = "GREG_MIRROR"
LOCK_NAME = "checksums.lock.json"
MARKER = ".complete"
DOWNLOAD_LOCK = ".download.lock"
CHUNK = 1 << 20
#: A transfer is abandoned when no byte arrives for this many seconds (``--read-timeout``) ...
READ_TIMEOUT = 60.0
#: ... or when fewer than this many bytes per second arrive, averaged over a window of ``READ_TIMEOUT``
#: seconds (``--min-rate``; 1 KiB/s: a server that sends one byte every few seconds never ends otherwise).
MIN_RATE = 1024.0


class DownloadError(RuntimeError):
    """Network failure or truncated transfer."""

    exit_code = 1  # an I/O failure for greg.errors.cli_errors (not bad input)


class ChecksumError(RuntimeError):
    """A file's digest differs from the expected one."""


class ManualDownloadRequired(RuntimeError):
    """Licensed data (ImageNet) that must be placed by hand; the message says where."""


class UnsafePathError(RuntimeError):
    """A file greg would write in a dataset directory is a symbolic link: refused, never written through."""


def refuse_symlink(path: Path) -> None:
    """Raise :class:`UnsafePathError` when ``path`` itself is a symbolic link."""
    if os.path.islink(path):
        raise UnsafePathError(
            f"refusing to write through the symbolic link {path} (-> {os.readlink(path)}): greg writes only "
            "regular files in a dataset directory; remove the link"
        )


def open_nofollow(path: Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` with ``O_NOFOLLOW``: a symbolic link at ``path`` raises :class:`UnsafePathError`."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_symlink(path)
        raise


@contextlib.contextmanager
def download_lock(directory: Path, name: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/.download.lock`` for the block; when another process holds
    it (two sets sharing one directory, downloaded at once), say so and wait for it."""
    path = directory / DOWNLOAD_LOCK
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            print(f"{name}: {directory} is being downloaded by {holder}; waiting for it", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({name})\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve_url(resource: Resource, url_base: str | None = None) -> str:
    """``url_base`` (argument, else ``$GREG_DATA_URL_BASE``) + ``/`` + file name replaces the public URL:
    a mirror, or a local server in tests."""
    base = url_base or os.environ.get(URL_BASE_ENV)
    return f"{base.rstrip('/')}/{resource.filename}" if base else resource.url


def mirror_file(s: DatasetSpec, resource: Resource, mirror: str | Path | None) -> Path | None:
    """``<mirror>/<file>`` (or ``<mirror>/<data_dir>/<file>``) when ``mirror`` (argument, else
    ``$GREG_MIRROR``) is set and holds the file; else ``None``."""
    base = mirror or os.environ.get(MIRROR_ENV)
    if not base:
        return None
    if not Path(base).is_dir():
        raise FileNotFoundError(f"mirror directory {base} (--mirror / ${MIRROR_ENV}) does not exist")
    for candidate in (Path(base) / resource.filename, Path(base) / s.directory / resource.filename):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------- alternative digests
_ALGO_BY_LENGTH = {32: "md5", 64: "sha256"}
_HEX = re.compile(r"[0-9a-fA-F]+")


def parse_digest(text: str, what: str) -> str:
    """``"md5:<hex>"``/``"sha256:<hex>"`` or a bare 32/64-hex digest -> ``"algo:hex"`` (lower case);
    ``ValueError`` naming ``what`` otherwise."""
    algo, sep, digest = text.strip().partition(":")
    if not sep:
        algo, digest = _ALGO_BY_LENGTH.get(len(text.strip()), ""), text.strip()
    digest = digest.lower()
    if (
        algo not in ("md5", "sha256")
        or not _HEX.fullmatch(digest)
        or _ALGO_BY_LENGTH.get(len(digest)) != algo
    ):
        raise ValueError(
            f"{what}: {text!r} is not a digest; allowed: md5:<32 hex>, sha256:<64 hex>, or the bare hex digest"
        )
    return f"{algo}:{digest}"


def read_checksums_file(path: str | Path) -> dict[str, str]:
    """``{name: "algo:hex"}`` from a ``sha256sum``/``md5sum`` file: lines ``<hex>  <name>`` (``*<name>``
    too), ``#`` comments and blank lines ignored; the algorithm follows from the digest's length. ``name``
    is a file name (``test_256.tar``), a path under the dataset directory (``cifar-10-batches-py/test_batch``)
    or either prefixed with the dataset directory (``textures/dtd-r1.0.1.tar.gz``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"checksum file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().removeprefix("*")
        if not name:
            raise ValueError(
                f"checksum file {path} line {n}: expected '<hex digest>  <file name>', got {line!r}"
            )
        out[name] = parse_digest(digest, f"checksum file {path} line {n}")
    return out


class Override:
    """A digest that replaces the published one for one file: from a checksum file (``--checksums``,
    ``kind="checksums"``) or an explicit ``--accept-checksum`` (``kind="accept"``)."""

    def __init__(self, checksum: str, origin: str, kind: str):
        self.checksum, self.origin, self.kind = checksum, origin, kind

    def record(self, published: str | None) -> dict:
        return {"checksum": self.checksum, "origin": self.origin, "kind": self.kind, "published": published}


def overrides_for(
    s: DatasetSpec,
    checksums: str | Path | None = None,
    accept: Mapping[str, str] | None = None,
) -> dict[str, Override]:
    """The alternative digests that apply to ``s``, by path under its directory (resource file names and
    ``file_checksums`` paths). ``checksums``: a checksum file (else ``$GREG_DATA_CHECKSUMS``); ``accept``:
    ``{name: digest}`` where ``name`` is a file name, ``<dir>/<file>``, or the dataset's name when it has one
    resource. An ``accept`` entry wins over the checksum file."""
    rels = [r.filename for r in s.resources] + list(s.file_checksums)
    out: dict[str, Override] = {}
    sources: list[tuple[dict[str, str], str, str]] = []
    path = checksums or os.environ.get(CHECKSUMS_ENV)
    if path:
        sources.append((read_checksums_file(path), f"checksum file {path}", "checksums"))
    if accept:
        named = {}
        for k, v in accept.items():
            if k == s.name and len(s.resources) == 1:
                k = s.resources[0].filename
            named[k] = parse_digest(v, f"--accept-checksum {k}")
        sources.append((named, "--accept-checksum", "accept"))
    for table, origin, kind in sources:
        for rel in rels:
            for key in (f"{s.directory}/{rel}", rel):
                if key in table:
                    out[rel] = Override(table[key], origin, kind)
                    break
    return out


def _warn(msg: str) -> None:
    print(f"greg data: warning: {msg}", file=sys.stderr, flush=True)


def _offline_hint(s: DatasetSpec, resource: Resource, dest: Path) -> str:
    """What to do when a download cannot happen (no network on the node, a dead URL)."""
    check = f"{resource.algorithm} {resource.digest}" if resource.checksum else "its sha256 is then recorded"
    return (
        f"to proceed without this URL, place the file by hand at {dest} ({check}), or pass --mirror DIR "
        f"(${MIRROR_ENV}) with a directory holding {resource.filename}, or --url-base URL (${URL_BASE_ENV})"
    )


# ---------------------------------------------------------------------------------------------- lock file
def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_NAME


def read_lock(root: Path) -> dict:
    p = lock_path(root)
    if not p.exists():
        return {"version": 1, "files": {}}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RuntimeError(f"checksum lock file {p} is not valid JSON ({e}); fix or delete it") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise RuntimeError(f"checksum lock file {p} has no 'files' mapping; fix or delete it")  # noqa: TRY004
    return data


def _lock_key(s: DatasetSpec, resource: Resource) -> str:
    return f"{s.directory}/{resource.filename}"


def expected_checksum(s: DatasetSpec, resource: Resource, root: Path) -> tuple[str, str, str] | None:
    """``(algorithm, digest, origin)`` to verify against, or ``None`` when nothing is known yet."""
    if resource.checksum is not None:
        return resource.algorithm, resource.digest, "published"
    entry = read_lock(root)["files"].get(_lock_key(s, resource))
    if entry is None:
        return None
    return "sha256", entry["sha256"], f"lock file {lock_path(root)}"


def _match(path: Path, checksums: list[str]) -> tuple[str | None, dict[str, str]]:
    """The first of ``checksums`` ("algo:hex") that ``path`` has, and the digests computed (by algorithm)."""
    got: dict[str, str] = {}
    for c in checksums:
        algo, _, hexd = c.partition(":")
        if algo not in got:
            got[algo] = file_digest(path, algo)
        if got[algo] == hexd:
            return c, got
    return None, got


def verify_file(
    path: Path,
    s: DatasetSpec,
    resource: Resource,
    root: Path,
    *,
    record: bool = True,
    override: Override | None = None,
) -> str:
    """Check ``path`` (the downloaded content of ``resource``); return ``"algo:digest"``.

    With no published checksum and no lock entry, record the file's sha256 in the lock (if ``record``).
    ``override``: an alternative digest the file may have instead (its use is printed as a warning)."""
    want = expected_checksum(s, resource, root)
    if override is not None:
        return _verify_with_override(path, s, resource, want, override)
    if want is None:
        if not record:
            raise ChecksumError(
                f"{resource.filename}: no published checksum and no entry in {lock_path(root)}"
            )
        return _record_in_lock(path, s, resource, root)
    algo, expected, origin = want
    actual = file_digest(path, algo)
    if actual != expected:
        escape = (
            f"; if you trust this file (e.g. the {origin} digest is known to be wrong), rerun with "
            f"--accept-checksum {resource.filename}={algo}:{actual}"
            if origin == "published"
            else ""
        )
        raise ChecksumError(
            f"checksum mismatch for {resource.filename} ({path}): expected {algo} {expected} ({origin}), "
            f"got {algo} {actual}{escape}"
        )
    return f"{algo}:{actual}"


def _verify_with_override(
    path: Path, s: DatasetSpec, resource: Resource, want: tuple[str, str, str] | None, override: Override
) -> str:
    """``path`` must have ``override``'s digest or the expected one ``want``; a match on the override
    alone is printed as a warning."""
    published = f"{want[0]}:{want[1]}" if want else None
    ok, got = _match(path, [override.checksum] + ([published] if published else []))
    if ok is None:
        algo = override.checksum.split(":")[0]
        also = f" nor {want[0]} {want[1]} ({want[2]})" if want else ""
        raise ChecksumError(
            f"checksum mismatch for {resource.filename} ({path}): neither {override.checksum} "
            f"({override.origin}){also} matches; got {algo} {got[algo]}"
        )
    if ok != published:
        _warn(
            f"{s.name}: {resource.filename} accepted with {ok} from {override.origin}, NOT the "
            f"{want[2] if want else 'recorded'} checksum {published or '(none)'}"
        )
    return ok


def _record_in_lock(path: Path, s: DatasetSpec, resource: Resource, root: Path) -> str:
    """Record the sha256 of ``path`` in the checksum lock file (a resource with no published digest);
    later downloads are verified against it."""
    digest = file_digest(path, "sha256")
    lock = read_lock(root)
    lock["files"][_lock_key(s, resource)] = {
        "sha256": digest,
        "size": path.stat().st_size,
        "url": resource.url,
        "recorded": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(lock_path(root), lock)
    print(
        f"{resource.filename}: no published checksum; recorded sha256 {digest} in {lock_path(root)} "
        f"(later downloads are verified against it)"
    )
    return f"sha256:{digest}"


# ------------------------------------------------------------------------------------------------- fetch
def _html_error(dest: Path, url: str, head: bytes) -> DownloadError:
    m = re.search(rb"<title[^>]*>([^<]{0,120})", head, re.IGNORECASE)
    title = f" titled {m.group(1).decode('utf-8', 'replace').strip()!r}" if m else ""
    return DownloadError(
        f"downloading {dest.name} from {url}: got an HTML page{title}, not the file (a quota, virus-scan or "
        "login page?); nothing was kept"
    )


def _looks_like_html(head: bytes) -> bool:
    h = head.lstrip()[:15].lower()
    return h.startswith((b"<!doctype html", b"<html"))


def fetch(
    url: str,
    dest: Path,
    *,
    progress: bool = True,
    timeout: float | None = None,
    min_rate: float | None = None,
) -> Path:
    """Download ``url`` to ``dest.part`` (resuming it with an HTTP Range request when the server allows);
    raise :class:`DownloadError` if fewer bytes arrive than announced, if nothing arrives for ``timeout``
    seconds (:data:`READ_TIMEOUT`), or if fewer than ``min_rate`` bytes/s (:data:`MIN_RATE`) arrive over any
    ``timeout``-second window; the ``.part`` is kept for a later resume. An HTML page where a data file is
    expected is refused (``.part`` not written). Returns the ``.part`` path."""
    t = _Transfer(
        url,
        dest,
        dest.with_name(dest.name + ".part"),
        READ_TIMEOUT if timeout is None else float(timeout),
        MIN_RATE if min_rate is None else float(min_rate),
    )
    t.part.parent.mkdir(parents=True, exist_ok=True)
    refuse_symlink(t.part)
    pos = t.part.stat().st_size if t.part.exists() else 0
    resp = _request(t, pos)
    if resp is None:  # nothing left past our partial file: it is complete (checksum decides)
        return t.part
    with resp:
        length = resp.headers.get("Content-Length")
        ctype = (resp.headers.get("Content-Type") or "").lower()
        if ctype.startswith("text/html") and not t.html_ok:
            raise _html_error(dest, url, resp.read1(4096) if hasattr(resp, "read1") else b"")
        if pos and resp.status == 206:
            flags, total = os.O_APPEND, (pos + int(length)) if length is not None else None
        else:  # no resume support (200): start over
            flags, pos, total = os.O_TRUNC, 0, int(length) if length is not None else None
        got = _stream(t, resp, flags, pos, total, progress)
    if total is not None and got != total:
        raise DownloadError(
            f"download of {dest.name} from {url} is truncated: received {got} of {total} bytes; {t.kept}"
        )
    return t.part


@dataclass(frozen=True)
class _Transfer:
    """One :func:`fetch`: what its messages name and the limits it runs under."""

    url: str
    dest: Path
    part: Path
    timeout: float
    min_rate: float

    @property
    def html_ok(self) -> bool:
        return self.dest.name.lower().endswith((".html", ".htm"))

    @property
    def kept(self) -> str:
        return f"the partial file {self.part} is kept and the next run resumes it"


def _request(t: _Transfer, pos: int) -> http.client.HTTPResponse | None:
    """The open response for ``t.url`` (from byte ``pos`` with a Range request when ``pos`` > 0), or
    ``None`` when the server answers a resume with 416 (range not satisfiable)."""
    headers = {"User-Agent": "greg-data/0.1"}
    if pos:
        headers["Range"] = f"bytes={pos}-"
    try:
        return urlopen(Request(t.url, headers=headers), timeout=t.timeout)
    except HTTPError as e:
        if e.code == 416 and pos:
            return None
        raise DownloadError(f"downloading {t.dest.name} from {t.url} failed: HTTP {e.code} {e.reason}") from e
    except (URLError, OSError) as e:
        raise DownloadError(f"downloading {t.dest.name} from {t.url} failed: {e}") from e


def _stream(
    t: _Transfer, resp: http.client.HTTPResponse, flags: int, pos: int, total: int | None, progress: bool
) -> int:
    """Write the body of ``resp`` to ``t.part`` (``flags``: append or truncate; ``pos`` bytes already
    there), under the read-timeout and min-rate rules; returns the bytes the part file then holds."""
    got = pos
    first = pos == 0
    # read1: return what has arrived (read(n) would wait for n bytes, so the rate rule could never act)
    read = resp.read1 if hasattr(resp, "read1") else resp.read
    fd = None
    with tqdm(
        total=total, initial=pos, unit="B", unit_scale=True, desc=t.dest.name, disable=not progress
    ) as bar:
        try:
            rate = _MinRate(t)
            while True:
                chunk = _read_chunk(t, read, got, total)
                if first and chunk:
                    if _looks_like_html(chunk) and not t.html_ok:
                        raise _html_error(t.dest, t.url, chunk)
                    first = False
                if fd is None:  # opened only once the content is known not to be a web page
                    fd = open_nofollow(t.part, os.O_WRONLY | os.O_CREAT | flags)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                got += len(chunk)
                bar.update(len(chunk))
                rate.update(len(chunk), got)
        finally:
            if fd is not None:
                os.close(fd)
    return got


def _read_chunk(t: _Transfer, read, got: int, total: int | None) -> bytes:
    """The next chunk of the body; a stall (nothing for ``t.timeout`` s) or a cut connection raises
    :class:`DownloadError` (the part file is kept)."""
    try:
        return read(CHUNK)
    except TimeoutError as e:
        raise DownloadError(
            f"download of {t.dest.name} from {t.url} stalled: no data for {t.timeout:g} s "
            f"(--read-timeout) after {got} of {total if total is not None else '?'} bytes; {t.kept}"
        ) from e
    except (http.client.IncompleteRead, OSError) as e:
        raise DownloadError(
            f"download of {t.dest.name} from {t.url} was cut off after {got} of {total} bytes ({e}); {t.kept}"
        ) from e


class _MinRate:
    """The ``--min-rate`` rule: each window of ``t.timeout`` seconds must average ``t.min_rate`` bytes/s
    (a server that sends one byte every few seconds never times out otherwise)."""

    def __init__(self, t: _Transfer):
        self.t = t
        self.start, self.bytes = time.monotonic(), 0

    def update(self, n: int, got: int) -> None:
        """Count ``n`` more bytes (``got`` in all); raise :class:`DownloadError` at a window's end when too slow."""
        self.bytes += n
        now = time.monotonic()
        if now - self.start >= self.t.timeout:
            rate = self.bytes / (now - self.start)
            if rate < self.t.min_rate:
                raise DownloadError(
                    f"download of {self.t.dest.name} from {self.t.url} is too slow: {rate:.0f} bytes/s over the "
                    f"last {now - self.start:.0f} s, below the minimum {self.t.min_rate:g} bytes/s "
                    f"(--min-rate) after {got} bytes; {self.t.kept}"
                )
            self.start, self.bytes = now, 0


# ------------------------------------------------------------------------------------------------ extract
def _refuse_links_below(to: Path, member: str, archive: Path) -> None:
    """Raise :class:`UnsafePathError` when any existing component of ``to/member`` below ``to`` (``to``
    itself may be a link: a data directory on another disk) is a symbolic link: writing the member would
    write through it."""
    cur = to
    for part in Path(os.path.normpath(member.lstrip("/"))).parts:
        if part in ("", "."):
            continue
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return  # nothing below a missing component exists
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(
                f"cannot extract {archive}: member {member!r} would be written through the symbolic link "
                f"{cur} (-> {os.readlink(cur)}); remove the link"
            )


def extract(archive: Path, to: Path) -> list[str]:
    """Unpack a tar (any compression) or zip archive into ``to``, refusing paths that leave ``to`` and
    members that would be written through an existing symbolic link. Returns the regular files written, as
    POSIX paths relative to ``to``."""
    to.mkdir(parents=True, exist_ok=True)
    name = archive.name
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                base = to.resolve()
                for member in z.namelist():
                    _refuse_links_below(to, member, archive)
                    target = (to / member).resolve()
                    if base != target and base not in target.parents:
                        raise RuntimeError(f"{archive}: member {member!r} would be written outside {to}")
                z.extractall(to)
                names = [i.filename for i in z.infolist() if not i.is_dir()]
        else:

            def nofollow(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
                # called just before each member is written: sees links made by earlier members too
                _refuse_links_below(to, member.name, archive)
                return tarfile.data_filter(member, dest)

            with tarfile.open(archive) as t:
                t.extractall(to, filter=nofollow)
                names = [m.name for m in t.getmembers() if m.isfile()]
    except UnsafePathError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise RuntimeError(f"cannot extract {archive}: {e}") from e
    # the data filter strips leading slashes; keep what is really there
    files = {Path(os.path.normpath(n.lstrip("/"))).as_posix() for n in names}
    return sorted(f for f in files if (to / f).is_file())


# ----------------------------------------------------------------------------------- extracted files
def _check_digest(path: Path, checksum: str, what: str, origin: str, fix: str) -> None:
    """Raise ``FileNotFoundError``/:class:`ChecksumError` unless ``path`` has ``checksum`` ("algo:hex")."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {fix}")
    algo, _, expected = checksum.partition(":")
    actual = file_digest(path, algo)
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch for {what} ({path}): expected {algo} {expected} ({origin}), "
            f"got {algo} {actual}; {fix}"
        )


def _fix(s: DatasetSpec, root: Path) -> str:
    return f"run `greg data download {s.name} --root {root} --force`"


def check_file_checksums(
    s: DatasetSpec,
    root: str | Path,
    paths: list[str] | None = None,
    overrides: Mapping[str, Override | dict] | None = None,
) -> int:
    """Check extracted files against their published digests (``s.file_checksums``; all of them, or
    ``paths``). A file may instead have the alternative digest of ``overrides`` (default: those recorded in
    ``.complete`` when it was downloaded with ``--checksums``/``--accept-checksum``). Raises
    ``FileNotFoundError`` / :class:`ChecksumError` naming the file and both digests; returns how many were
    checked."""
    root = Path(root)
    d = root / s.directory
    paths = list(s.file_checksums) if paths is None else paths
    if overrides is None:
        overrides = marker_overrides(s, root) if (d / MARKER).is_file() else {}
    for rel in paths:
        alt = overrides.get(rel)
        if alt is None:
            _check_digest(d / rel, s.file_checksums[rel], rel, "published", _fix(s, root))
            continue
        checksum, origin = (
            (alt.checksum, alt.origin) if isinstance(alt, Override) else (alt["checksum"], alt["origin"])
        )
        if not (d / rel).is_file():
            raise FileNotFoundError(f"{d / rel} is missing; {_fix(s, root)}")
        if _match(d / rel, [checksum, s.file_checksums[rel]])[0] is None:
            _check_digest(d / rel, checksum, rel, origin, _fix(s, root))  # raises, naming both digests
    return len(paths)


def read_marker(s: DatasetSpec, root: str | Path) -> dict:
    """The ``.complete`` JSON of ``s`` (``{}`` for an empty or pre-JSON marker). Its ``files``,
    ``extracted`` and ``overrides`` entries are checked to be mappings of the expected kind
    (:class:`CorruptDataError` naming the marker otherwise)."""
    p = Path(root) / s.directory / MARKER
    refuse_symlink(p)
    text = p.read_text(encoding="utf-8").strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"{p} is not valid JSON ({e}); {_fix(s, Path(root))}") from e
    if not isinstance(data, dict):
        return {}
    for key, value_kind in (("files", str), ("extracted", str), ("overrides", dict)):
        v = data.get(key)
        if v is not None and not (
            isinstance(v, dict)
            and all(isinstance(k, str) and isinstance(x, value_kind) for k, x in v.items())
        ):
            raise CorruptDataError(
                f"{p}: '{key}' must be a mapping of file -> {value_kind.__name__}, got {type(v).__name__}; "
                f"{_fix(s, Path(root))}"
            )
    for rel, o in (data.get("overrides") or {}).items():
        if not (isinstance(o.get("checksum"), str) and isinstance(o.get("origin"), str)):
            raise CorruptDataError(
                f"{p}: overrides[{rel!r}] needs 'checksum' and 'origin'; {_fix(s, Path(root))}"
            )
    return data


def marker_overrides(s: DatasetSpec, root: str | Path) -> dict[str, dict]:
    """The alternative digests recorded in ``.complete`` (``{path: {"checksum", "origin", ...}}``)."""
    return read_marker(s, root).get("overrides") or {}


# ----------------------------------------------------------------------------------------------- datasets
def _as_spec(name_or_spec: str | DatasetSpec) -> DatasetSpec:
    return name_or_spec if isinstance(name_or_spec, DatasetSpec) else spec(name_or_spec)


def missing_layout(s: DatasetSpec, root: Path) -> list[str]:
    d = Path(root) / s.directory
    return [p for p in s.layout if not (d / p).exists()]


def _check_placement(s: DatasetSpec, root: Path) -> list[str]:
    if s.placement_check is None:
        raise ManualDownloadRequired(f"{s.name}: never downloaded by greg; {s.manual}")
    return s.placement_check(s, root)


def _stale(s: DatasetSpec, root: Path) -> str | None:
    """Why the ``.complete`` of ``s`` does not describe the catalog's current files (a marker written for
    another file, e.g. before a set's source changed), else ``None``. Markers without ``files`` (older
    greg, tests) are taken as they are."""
    files = read_marker(s, root).get("files") or {}
    want = {r.filename for r in s.resources}
    if files and not want <= set(files):
        return (
            f"{Path(root) / s.directory / MARKER} records {', '.join(sorted(files))}, the catalog now expects "
            f"{', '.join(sorted(want))}"
        )
    return None


def is_complete(s: DatasetSpec, root: Path) -> bool:
    marker = Path(root) / s.directory / MARKER
    refuse_symlink(marker)
    return marker.is_file()


def _count_images(s: DatasetSpec, d: Path) -> int:
    return sum(len(list_images(d / p)) for p in s.layout if (d / p).is_dir())


def download(
    name_or_spec: str | DatasetSpec,
    root: str | Path,
    *,
    url_base: str | None = None,
    mirror: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    checksums: str | Path | None = None,
    accept: Mapping[str, str] | None = None,
    read_timeout: float | None = None,
    min_rate: float | None = None,
) -> Path:
    """Download, verify and extract a dataset into ``<root>/<data_dir>``; idempotent (see module doc).
    ``mirror`` (else ``$GREG_MIRROR``): a local directory tried before the network (:func:`mirror_file`).
    ``url_base`` (else ``$GREG_DATA_URL_BASE``): fetch ``<url_base>/<file name>`` instead of the public URL.
    ``checksums`` (else ``$GREG_DATA_CHECKSUMS``): a ``sha256sum``-format file whose digests replace the
    published ones (e.g. for stand-in files served from ``url_base``); ``accept``: ``{file: digest}``
    accepted instead of a published digest known to be wrong. Each replaced digest is printed as a warning
    and recorded in ``.complete``; with a checksum file the image count is not checked (other files).
    ``read_timeout`` / ``min_rate``: see :func:`fetch`.

    ImageNet-based sets are never downloaded: their placement is checked, and
    :class:`ManualDownloadRequired` explains where the licensed files go."""
    s = _as_spec(name_or_spec)
    root = Path(root)
    d = root / s.directory
    if s.manual is not None:
        _check_placement(s, root)
        return d
    if not s.resources:
        print(f"{s.name}: generated locally (no download needed)")
        return d
    marker = d / MARKER

    def done() -> bool:
        if force or not is_complete(s, root):
            return False
        why = _stale(s, root)
        if why:
            print(f"{s.name}: {why}; downloading again")
            return False
        print(f"{s.name}: already downloaded and verified ({marker})")
        return True

    if done():
        return d
    overrides = overrides_for(s, checksums, accept)
    d.mkdir(parents=True, exist_ok=True)
    with download_lock(d, s.name):
        if not force and done():  # another process finished it while we waited for the lock
            return d
        _download_locked(s, root, overrides, url_base, mirror, progress, read_timeout, min_rate)
    return d


def _download_locked(
    s: DatasetSpec,
    root: Path,
    overrides: dict[str, Override],
    url_base: str | None,
    mirror: str | Path | None,
    progress: bool,
    read_timeout: float | None,
    min_rate: float | None,
) -> None:
    """Steps 2-4 of the module doc, under the directory's download lock: obtain and verify each resource,
    extract archives, check layout, extracted digests and image count, write ``.complete`` last."""
    d = root / s.directory
    refuse_symlink(d / MARKER)
    verified: dict[str, str] = {}
    extracted: set[str] = set()
    used: dict[str, dict] = {}
    for res in s.resources:
        dest = d / res.filename
        alt = overrides.get(res.filename)
        part = dest.with_name(dest.name + ".part")
        refuse_symlink(part)
        if dest.exists():  # a verified earlier download, or a file placed by hand: check it all the same
            verified[res.filename] = _verify_or_set_aside(dest, dest, s, res, root, alt)
        else:
            part = _obtain(s, res, dest, part, url_base, mirror, progress, read_timeout, min_rate)
            verified[res.filename] = _verify_or_set_aside(part, dest, s, res, root, alt)
            os.replace(part, dest)
        if alt is not None and verified[res.filename] != res.checksum:
            used[res.filename] = alt.record(res.checksum)
        if res.is_archive:
            print(f"{s.name}: extracting {dest.name}")
            extracted.update(extract(dest, d))
    used.update(_check_extracted(s, root, overrides))
    _write_marker(s, root, verified, extracted, used, progress)


def _obtain(
    s: DatasetSpec,
    res: Resource,
    dest: Path,
    part: Path,
    url_base: str | None,
    mirror: str | Path | None,
    progress: bool,
    read_timeout: float | None,
    min_rate: float | None,
) -> Path:
    """The unverified content of ``res`` in a ``.part`` file: copied from the mirror when it holds the file,
    else fetched from its URL (a failure names the offline ways out)."""
    src = mirror_file(s, res, mirror)
    if src is not None:
        print(f"{s.name}: copying {src} (mirror)")
        _copy_nofollow(src, part)
        return part
    url = resolve_url(res, url_base)
    if mirror or os.environ.get(MIRROR_ENV):
        print(f"{s.name}: {res.filename} is not in the mirror; falling back to the URL")
    print(f"{s.name}: downloading {url}")
    try:
        return fetch(url, dest, progress=progress, timeout=read_timeout, min_rate=min_rate)
    except DownloadError as e:
        raise DownloadError(f"{e}; {_offline_hint(s, res, dest)}") from e


def _verify_or_set_aside(
    path: Path, dest: Path, s: DatasetSpec, res: Resource, root: Path, alt: Override | None
) -> str:
    """:func:`verify_file` on ``path``; on a mismatch it is renamed to ``<dest>.corrupt`` first."""
    try:
        return verify_file(path, s, res, root, override=alt)
    except ChecksumError:
        os.replace(path, dest.with_name(dest.name + ".corrupt"))
        raise


def _check_extracted(s: DatasetSpec, root: Path, overrides: dict[str, Override]) -> dict[str, dict]:
    """Check the expected layout and the extracted files' digests; returns the alternative digests used
    instead of published ones (each printed as a warning), for ``.complete``."""
    d = root / s.directory
    missing = missing_layout(s, root)
    if missing:
        raise RuntimeError(
            f"{s.name}: after extraction these expected paths are missing under {d}: {', '.join(missing)}"
        )
    file_alts = {rel: o for rel, o in overrides.items() if rel in s.file_checksums}
    check_file_checksums(s, root, overrides=file_alts)
    used = {}
    for rel, o in file_alts.items():
        if _match(d / rel, [s.file_checksums[rel]])[0] is None:
            _warn(
                f"{s.name}: {rel} accepted with {o.checksum} from {o.origin}, NOT the published {s.file_checksums[rel]}"
            )
            used[rel] = o.record(s.file_checksums[rel])
    return used


def _write_marker(
    s: DatasetSpec,
    root: Path,
    verified: dict[str, str],
    extracted: set[str],
    used: dict[str, dict],
    progress: bool,
) -> None:
    """Count the images against the catalog, then write ``.complete`` (the verified digests, the overrides
    used, the sha256 of every extracted file)."""
    d = root / s.directory
    record: dict = {"dataset": s.name, "files": verified}
    if s.archive_images is not None:
        n = _count_images(s, d)
        where = ", ".join(str(d / p) for p in s.layout)
        if any(u["kind"] == "checksums" for u in used.values()):
            print(f"{s.name}: {n} images under {where}; count not checked (files from a checksum file)")
        elif n != s.archive_images:
            raise CorruptDataError(
                f"{s.name}: {n} images under {where} after extraction, the catalog expects {s.archive_images} "
                f"(dot-files such as ._x.jpg are not counted); the archive is not the one the catalog describes"
            )
        record["images"] = n
    if used:
        record["overrides"] = used
    if extracted:  # re-checked by verify(), also once the archive is deleted
        files = tqdm(sorted(extracted), desc=f"{s.name}: hashing extracted files", disable=not progress)
        record["extracted"] = {f: f"sha256:{file_digest(d / f, 'sha256')}" for f in files}
    record["completed"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    atomic_write_json(d / MARKER, record)
    print(f"{s.name}: ready in {d}")


def _copy_nofollow(src: Path, part: Path) -> None:
    """Copy ``src`` to ``part`` without following a symbolic link at ``part``."""
    fd = open_nofollow(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
        while chunk := f.read(CHUNK):
            out.write(chunk)


def verify(name_or_spec: str | DatasetSpec, root: str | Path) -> list[str]:
    """Re-check a downloaded dataset: marker, digests of the kept files, layout, the published digests of
    extracted files (``file_checksums``) and the sha256 of every extracted file recorded in ``.complete``
    at extraction. Returns a list of lines describing what was checked; raises
    (``ChecksumError``/``FileNotFoundError``/...) on any problem."""
    s = _as_spec(name_or_spec)
    root = Path(root)
    d = root / s.directory
    if s.manual is not None:
        return _check_placement(s, root)
    if not s.resources:
        return [f"{s.name}: generated locally, nothing to verify"]
    if not is_complete(s, root):
        raise FileNotFoundError(
            f"{s.name}: {d / MARKER} not found; run `greg data download {s.name} --root {root}`"
        )
    why = _stale(s, root)
    if why:
        raise FileNotFoundError(f"{s.name}: {why}; run `greg data download {s.name} --root {root} --force`")
    lines = []
    recorded_alts = marker_overrides(s, root)
    for rel, o in recorded_alts.items():
        lines.append(
            f"WARNING: {rel} was accepted with {o['checksum']} from {o['origin']}, not the published "
            f"{o.get('published') or '(none)'}"
        )
    for res in s.resources:
        f = d / res.filename
        if f.exists():
            o = recorded_alts.get(res.filename)
            alt = Override(o["checksum"], o["origin"], o.get("kind", "")) if o else None
            lines.append(f"{res.filename}: {verify_file(f, s, res, root, record=False, override=alt)} OK")
        elif res.is_archive:
            lines.append(f"{res.filename}: archive removed after extraction; digest not re-checked")
        else:
            raise FileNotFoundError(f"{s.name}: {f} is missing; run `greg data download {s.name} --force`")
    missing = missing_layout(s, root)
    if missing:
        raise FileNotFoundError(f"{s.name}: missing under {d}: {', '.join(missing)}")
    layout_ok = f"layout OK ({', '.join(s.layout) or 'no layout paths'})"
    if s.file_checksums:
        n = check_file_checksums(s, root)
        lines.append(f"{n} extracted files match their published digests")
    recorded = read_marker(s, root).get("extracted")
    if recorded:
        todo = {f: c for f, c in recorded.items() if f not in s.file_checksums}
        origin = f"recorded in {d / MARKER} at extraction"
        for f, c in todo.items():
            _check_digest(d / f, c, f, origin, _fix(s, root))
        lines.append(f"{len(todo)} extracted files match the sha256 recorded at extraction")
    elif any(r.is_archive for r in s.resources) and not s.file_checksums:
        lines.append(
            "extracted files: no digests recorded (extracted by an older greg); "
            f"`greg data download {s.name} --root {root} --force` records them"
        )
    return [*lines, layout_ok]  # the layout line last, as before


def require(s: DatasetSpec, root: Path) -> Path:
    """The data directory of ``s``, or a clear error telling how to get it."""
    d = Path(root) / s.directory
    if not is_complete(s, root):
        raise FileNotFoundError(
            f"dataset {s.name!r} is not downloaded under {root} (no {d / MARKER}); "
            f"run `greg data download {s.name} --root {root}`"
        )
    why = _stale(s, root)
    if why:
        raise FileNotFoundError(f"dataset {s.name!r}: {why}; run `greg data download {s.name} --root {root}`")
    return d
