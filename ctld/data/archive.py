"""Find input files in folders and ZIP archives; extract ZIPs safely into a temporary folder.

    with discover(["/data/site_a", "/data/site_b.zip"]) as files:   # [(absolute Path, path relative to its source)]
        ...                                                          # the temp folder is removed on exit

ZIP safety (ZIP members are attacker-controlled names and sizes): a member whose name is absolute, has a drive
letter or a `..` component, or is a symlink is refused, as is an archive whose members would unpack to more than
`max_bytes` or that holds more than `max_members` entries. Extraction counts the bytes it really writes, so a
member whose header understates its size (a "zip bomb") is stopped at the limit, and nothing is written outside
the temporary folder.

Malformed but harmless members are skipped one by one, with a logged reason, and the rest of the archive is used:
a member with no file name (`./`, `.`) and a file whose name another member uses as a folder (`a` beside
`a/b.dcm`; the file is skipped, the folder's members are kept).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32 * 2**30
DEFAULT_MAX_MEMBERS = 200_000
MAX_NESTING = 2  # ZIPs inside ZIPs are opened this deep
# Errors that say a member's name cannot be a file on this file system (too long, invalid, clashes with a folder).
_BAD_NAME_ERRNOS = {errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.EISDIR, errno.ENOTDIR, errno.EEXIST}


class UnsafeArchiveError(ValueError):
    """A ZIP that would write outside its folder or unpack to an absurd size; nothing of it is used."""


def is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip" and zipfile.is_zipfile(path)


def _safe_member_path(name: str, archive: str) -> PurePosixPath:
    normalized = name.replace("\\", "/")
    member = PurePosixPath(normalized)
    first = member.parts[0] if member.parts else ""  # "./" and "." have no parts
    if normalized.startswith("/") or member.is_absolute() or ".." in member.parts or ":" in first:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside the extraction folder (absolute path, drive "
            "letter or '..'); refusing the whole archive. Re-create the ZIP with relative member names."
        )
    return member


def safe_extract_zip(
    zip_path: str | os.PathLike,
    dest_dir: str | os.PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    skipped: list | None = None,
) -> list[Path]:
    """Extract regular files of `zip_path` under `dest_dir`; returns their paths. Raises UnsafeArchiveError.
    Members skipped one by one (module docstring) are logged and, if given, appended to `skipped` as
    (member name, reason)."""
    zip_path, dest_dir = Path(zip_path), Path(dest_dir).resolve()
    name = zip_path.name
    written: list[Path] = []
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UnsafeArchiveError(f"{name}: not a readable ZIP archive ({error})") from error
    with archive:
        members = archive.infolist()
        if len(members) > max_members:
            raise UnsafeArchiveError(
                f"{name}: {len(members)} members exceeds shards.max_archive_members={max_members}; raise the limit "
                "if the archive is genuine"
            )
        declared = sum(m.file_size for m in members)
        if declared > max_bytes:
            raise UnsafeArchiveError(
                f"{name}: unpacks to {declared} bytes, over shards.max_archive_bytes={max_bytes}; raise the limit "
                "if the archive is genuine"
            )
        plan = []

        def skip(member: zipfile.ZipInfo, reason: str) -> None:
            logger.warning("%s: skipped member %r: %s", name, member.filename, reason)
            if skipped is not None:
                skipped.append((member.filename, reason))

        for member in members:
            relative = _safe_member_path(member.filename, name)
            mode = member.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{name}: member {member.filename!r} is a symbolic link; refusing the archive")
            if not relative.parts or relative.parts == (".",):
                skip(member, "no file name (a './' or '.' entry); nothing to extract")
                continue
            if member.is_dir():
                continue
            target = dest_dir.joinpath(*relative.parts).resolve()
            if dest_dir not in target.parents:
                raise UnsafeArchiveError(f"{name}: member {member.filename!r} resolves outside the extraction folder")
            plan.append((member, target))
        if len({target for _, target in plan}) < len(plan):
            raise UnsafeArchiveError(f"{name}: two members have the same name; refusing the archive")
        folders = {parent for _, target in plan for parent in target.parents}
        kept = []
        for member, target in plan:
            if target in folders:
                skip(member, "a file whose name other members use as a folder; the folder's members are kept")
            else:
                kept.append((member, target))
        plan = kept
        total = 0
        for member, target in plan:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "xb") as sink:
                    while chunk := source.read(1 << 20):
                        total += len(chunk)
                        if total > max_bytes or total > declared:
                            raise UnsafeArchiveError(
                                f"{name}: members unpack to more bytes than declared or than "
                                f"shards.max_archive_bytes={max_bytes} (a zip bomb?); refusing the archive"
                            )
                        sink.write(chunk)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError) as error:
                # Encrypted members, unsupported compression, CRC errors: unreadable, not unsafe, same outcome.
                raise UnsafeArchiveError(f"{name}: cannot extract {member.filename!r}: {error}") from error
            except OSError as error:
                if error.errno not in _BAD_NAME_ERRNOS:
                    raise  # e.g. a full disk: not the member's fault, and skipping would lose data silently
                skip(member, f"its name cannot be a file here ({error.strerror})")
                continue
            written.append(target)
    return written


def walk_files(source: str | os.PathLike) -> list[tuple[Path, str]]:
    """Regular files under a folder (recursively, sorted) or the file itself, with paths relative to `source`.

    Symbolic links are followed (a study folder linked into a data folder is read), each real folder once: a link
    to a folder read already or to one above it is logged as `symlink_loop` and not entered, a link that leads
    nowhere (dangling, or a cycle of links) as `broken_symlink`."""
    source = Path(source)
    if source.is_file():
        return [(source.resolve(), source.name)]
    if not source.is_dir():
        raise FileNotFoundError(f"input {source} does not exist; pass DICOM folders, ZIP files or NIfTI files")
    found = []
    visited = {os.path.realpath(source)}
    for root, dirs, names in os.walk(source, followlinks=True):
        kept = []
        real_root = Path(os.path.realpath(root))
        for dir_name in sorted(dirs):
            real = os.path.realpath(os.path.join(root, dir_name))
            if real in visited or Path(real) in real_root.parents:  # read already, or a link up: a loop
                rel = (Path(root) / dir_name).relative_to(source).as_posix()
                logger.warning("skipped %s (symlink_loop): a link to a folder read already or above it (%s)", rel, real)
                continue
            visited.add(real)
            kept.append(dir_name)
        dirs[:] = kept
        # One resolve per folder, not per file (resolve stats every path component: costly over 100k files).
        relative_root = Path(root).relative_to(source)
        for file_name in sorted(names):
            path = Path(root) / file_name
            if file_name.startswith("."):
                continue
            if path.is_file():
                resolved = path.resolve() if path.is_symlink() else real_root / file_name
                found.append((resolved, (relative_root / file_name).as_posix()))
            elif path.is_symlink():
                logger.warning("skipped %s (broken_symlink): the link leads to no file (dangling or a cycle of links)",
                               path.relative_to(source).as_posix())
    return found


@contextlib.contextmanager
def discover(
    sources,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    skipped: list | None = None,
) -> Iterator[list[tuple[Path, str]]]:
    """Yield every file under `sources` (folders, files, ZIPs; ZIPs opened, also when found inside folders)
    as (absolute path, path relative to its source; `archive.zip!member` for members). Unsafe archives are
    logged and, if given, appended to `skipped` as (relative path, reason, detail); the temp folder is removed
    on exit, also on errors."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    temp_root = Path(tempfile.mkdtemp(prefix="ctld-zip-"))
    try:
        files: list[tuple[Path, str]] = []
        pending = [(Path(s), "", 0) for s in sources]
        archives = 0
        while pending:
            source, prefix, depth = pending.pop(0)
            for path, rel in walk_files(source):
                rel = prefix + rel
                if path.suffix.lower() != ".zip":  # a broken .zip is refused by name below, not read as DICOM
                    files.append((path, rel))
                    continue
                if depth >= MAX_NESTING:
                    _record(skipped, rel, "unsafe_archive", f"ZIP nested deeper than {MAX_NESTING} levels")
                    continue
                archives += 1
                target = temp_root / f"{archives:06d}"
                try:
                    member_skips: list[tuple[str, str]] = []
                    safe_extract_zip(path, target, max_bytes=max_bytes, max_members=max_members,
                                     skipped=member_skips)
                except UnsafeArchiveError as error:
                    shutil.rmtree(target, ignore_errors=True)
                    _record(skipped, rel, "unsafe_archive", str(error))
                    continue
                for member_name, reason in member_skips:  # already logged by safe_extract_zip
                    if skipped is not None:
                        skipped.append((f"{rel}!{member_name}", "bad_archive_member", reason))
                if target.is_dir():
                    pending.append((target, rel + "!", depth + 1))
        yield files
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)


def _record(skipped: list | None, rel: str, reason: str, detail: str) -> None:
    logger.warning("skipped %s (%s): %s", rel, reason, detail)
    if skipped is not None:
        skipped.append((rel, reason, detail))
