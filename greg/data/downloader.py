"""Checksummed, resumable downloads; extraction; the ``.complete`` marker; the checksum lock file.

Flow of :func:`download` for one dataset (all under ``<root>/<data_dir>/``):

1. ``.complete`` exists -> nothing to do (no network).
2. per resource: copy ``<mirror>/<file>`` (``--mirror DIR`` / ``$GREG_MIRROR``) when the mirror holds it,
   else fetch ``URL`` into ``<file>.part`` (HTTP Range resumes a previous partial file), check the
   length the server announced, verify the checksum (published md5/sha256, else the sha256 in
   ``<root>/checksums.lock.json``, else record one there and say so), only then rename to ``<file>``.
   A mismatch renames the file to ``<file>.corrupt`` and raises :class:`ChecksumError` with both digests.
3. extract archives (tar/tar.gz with tarfile's ``data`` filter; zip with a path check),
4. check the expected layout and the published digests of extracted files (``DatasetSpec.file_checksums``,
   e.g. the CIFAR batches), write ``.complete`` last: JSON with the verified digests (``files``) and the
   sha256 of every extracted file (``extracted``), which :func:`verify` re-checks even after the archive is
   deleted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import http.client
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from greg.data.base import CorruptDataError, DatasetSpec, Resource, spec
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
#: A local directory holding files under their catalog file names (CI: the checkpoint folder beside the checkout); copied, then
#: verified against the same checksums as a download.
MIRROR_ENV = "GREG_MIRROR"
LOCK_NAME = "checksums.lock.json"
MARKER = ".complete"
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """Network failure or truncated transfer."""

    exit_code = 1  # an I/O failure for greg.errors.cli_errors (not bad input)


class ChecksumError(RuntimeError):
    """A file's digest differs from the expected one."""


class ManualDownloadRequired(RuntimeError):
    """Licensed data (ImageNet) that must be placed by hand; the message says where."""


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


def verify_file(path: Path, s: DatasetSpec, resource: Resource, root: Path, *, record: bool = True) -> str:
    """Check ``path`` (the downloaded content of ``resource``); return ``"algo:digest"``.

    With no published checksum and no lock entry, record the file's sha256 in the lock (if ``record``)."""
    want = expected_checksum(s, resource, root)
    if want is None:
        digest = file_digest(path, "sha256")
        if not record:
            raise ChecksumError(
                f"{resource.filename}: no published checksum and no entry in {lock_path(root)}"
            )
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
    algo, expected, origin = want
    actual = file_digest(path, algo)
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch for {resource.filename} ({path}): expected {algo} {expected} ({origin}), "
            f"got {algo} {actual}"
        )
    return f"{algo}:{actual}"


# ------------------------------------------------------------------------------------------------- fetch
def fetch(url: str, dest: Path, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest.part`` (resuming it with an HTTP Range request when the server allows);
    raise :class:`DownloadError` if fewer bytes arrive than announced. Returns the ``.part`` path."""
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    pos = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "greg-data/0.1"}
    if pos:
        headers["Range"] = f"bytes={pos}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and pos:  # nothing left past our partial file: it is complete (checksum decides)
            return part
        raise DownloadError(f"downloading {dest.name} from {url} failed: HTTP {e.code} {e.reason}") from e
    except (URLError, OSError) as e:
        raise DownloadError(f"downloading {dest.name} from {url} failed: {e}") from e
    with resp:
        length = resp.headers.get("Content-Length")
        if pos and resp.status == 206:
            mode, total = "ab", (pos + int(length)) if length is not None else None
        else:  # no resume support (200): start over
            mode, pos, total = "wb", 0, int(length) if length is not None else None
        got = pos
        with (
            open(part, mode) as f,
            tqdm(
                total=total, initial=pos, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar,
        ):
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (http.client.IncompleteRead, OSError) as e:
                    raise DownloadError(
                        f"download of {dest.name} from {url} was cut off after {got} of {total} bytes ({e}); "
                        f"the partial file {part} is kept and the next run resumes it"
                    ) from e
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if total is not None and got != total:
        raise DownloadError(
            f"download of {dest.name} from {url} is truncated: received {got} of {total} bytes; "
            f"the partial file {part} is kept and the next run resumes it"
        )
    return part


# ------------------------------------------------------------------------------------------------ extract
def extract(archive: Path, to: Path) -> list[str]:
    """Unpack a tar (any compression) or zip archive into ``to``, refusing paths that leave ``to``.
    Returns the regular files written, as POSIX paths relative to ``to``."""
    to.mkdir(parents=True, exist_ok=True)
    name = archive.name
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                base = to.resolve()
                for member in z.namelist():
                    target = (to / member).resolve()
                    if base != target and base not in target.parents:
                        raise RuntimeError(f"{archive}: member {member!r} would be written outside {to}")
                z.extractall(to)
                names = [i.filename for i in z.infolist() if not i.is_dir()]
        else:
            with tarfile.open(archive) as t:
                t.extractall(to, filter="data")
                names = [m.name for m in t.getmembers() if m.isfile()]
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


def check_file_checksums(s: DatasetSpec, root: str | Path, paths: list[str] | None = None) -> int:
    """Check extracted files against their published digests (``s.file_checksums``; all of them, or
    ``paths``). Raises ``FileNotFoundError`` / :class:`ChecksumError` naming the file and both digests;
    returns how many were checked."""
    root = Path(root)
    d = root / s.directory
    paths = list(s.file_checksums) if paths is None else paths
    for rel in paths:
        _check_digest(d / rel, s.file_checksums[rel], rel, "published", _fix(s, root))
    return len(paths)


def read_marker(s: DatasetSpec, root: str | Path) -> dict:
    """The ``.complete`` JSON of ``s`` (``{}`` for an empty or pre-JSON marker)."""
    p = Path(root) / s.directory / MARKER
    text = p.read_text(encoding="utf-8").strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"{p} is not valid JSON ({e}); {_fix(s, Path(root))}") from e
    return data if isinstance(data, dict) else {}


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


def is_complete(s: DatasetSpec, root: Path) -> bool:
    return (Path(root) / s.directory / MARKER).is_file()


def download(
    name_or_spec: str | DatasetSpec,
    root: str | Path,
    *,
    url_base: str | None = None,
    mirror: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Download, verify and extract a dataset into ``<root>/<data_dir>``; idempotent (see module doc).
    ``mirror`` (else ``$GREG_MIRROR``): a local directory tried before the network (:func:`mirror_file`).

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
    if marker.is_file() and not force:
        print(f"{s.name}: already downloaded and verified ({marker})")
        return d
    d.mkdir(parents=True, exist_ok=True)
    verified: dict[str, str] = {}
    extracted: set[str] = set()
    for res in s.resources:
        dest = d / res.filename
        if dest.exists():  # a verified earlier download, or a file placed by hand: check it all the same
            try:
                verified[res.filename] = verify_file(dest, s, res, root)
            except ChecksumError:
                os.replace(dest, dest.with_name(dest.name + ".corrupt"))
                raise
        else:
            src = mirror_file(s, res, mirror)
            if src is not None:
                print(f"{s.name}: copying {src} (mirror)")
                part = dest.with_name(dest.name + ".part")
                shutil.copyfile(src, part)
            else:
                url = resolve_url(res, url_base)
                if mirror or os.environ.get(MIRROR_ENV):
                    print(f"{s.name}: {res.filename} is not in the mirror; falling back to the URL")
                print(f"{s.name}: downloading {url}")
                try:
                    part = fetch(url, dest, progress=progress)
                except DownloadError as e:
                    raise DownloadError(f"{e}; {_offline_hint(s, res, dest)}") from e
            try:
                verified[res.filename] = verify_file(part, s, res, root)
            except ChecksumError:
                os.replace(part, dest.with_name(dest.name + ".corrupt"))
                raise
            os.replace(part, dest)
        if res.is_archive:
            print(f"{s.name}: extracting {dest.name}")
            extracted.update(extract(dest, d))
    missing = missing_layout(s, root)
    if missing:
        raise RuntimeError(
            f"{s.name}: after extraction these expected paths are missing under {d}: {', '.join(missing)}"
        )
    check_file_checksums(s, root)
    record = {"dataset": s.name, "files": verified}
    if extracted:  # re-checked by verify(), also once the archive is deleted
        files = tqdm(sorted(extracted), desc=f"{s.name}: hashing extracted files", disable=not progress)
        record["extracted"] = {f: f"sha256:{file_digest(d / f, 'sha256')}" for f in files}
    record["completed"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    atomic_write_json(marker, record)
    print(f"{s.name}: ready in {d}")
    return d


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
    lines = []
    for res in s.resources:
        f = d / res.filename
        if f.exists():
            lines.append(f"{res.filename}: {verify_file(f, s, res, root, record=False)} OK")
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
    return d
