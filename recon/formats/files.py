"""Files from and to the outside: the check of a name from outside before it becomes a path,
and the project's one atomic writer.

:func:`atomic_writer` / :func:`atomic_write_bytes` are the one temp-file-and-rename writer
(behind meshes, training checkpoints and ``infra.storage``'s local files). The temporary
file is ``.<name>.<random>.tmp`` in the target folder: hidden, and skipped by
``infra.storage.list_files``. It is created with mode ``0o666`` less the process's umask, as
``open()`` would create the file, so outputs follow the umask (0644 under 022, 0600 under 077).

:func:`check_name` / :func:`path_inside` are the one check of a name from outside (an S3 key
or a file below an input folder, relative to where it was found) before a path is built from
it: no absolute or empty parts, no ``.``/``..``, no control or shell characters, and the path
(symlinks followed) stays inside its folder.

:func:`wildface_home` is where wildface keeps its own files on a machine (the model store,
built face models): ``$WILDFACE_HOME``, else ``~/.cache/wildface``.
"""
from __future__ import annotations

import io
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

#: Characters refused in a name: the shell's operators, expansions and quotes, glob and brace
#: patterns (WebDataset expands ``{a,b}`` in URLs) and the Windows separator. No shell or URL
#: parser sees our paths, but a name carrying them is no photo's name and would be a hazard
#: to any later tool. Spaces, parentheses and apostrophes (``IMG (1).jpg``) stay allowed.
REFUSED_CHARACTERS = frozenset(';&|$`<>"\\*?{}!')
_MAX_PART_BYTES = 255  # the longest file name of common file systems (ext4, APFS, NTFS)


#: The environment variable naming wildface's own folder (:func:`wildface_home`).
HOME_ENV = "WILDFACE_HOME"


def wildface_home() -> str:
    """``$WILDFACE_HOME``, else ``~/.cache/wildface``: the folder (or, for the model store, an
    ``s3://`` prefix) where wildface keeps its own files."""
    return os.environ.get(HOME_ENV) or str(Path.home() / ".cache" / "wildface")


class UnsafeName(ValueError):
    """A name from outside that cannot become a path below a folder (the message says why)."""


def check_name(name: str) -> str:
    """``name`` ('/'-separated, relative to the folder it will live in) when a path may be
    built from it, else UnsafeName: absolute, empty parts (``a//b``, a trailing ``/``),
    ``.`` or ``..`` parts, control characters, :data:`REFUSED_CHARACTERS`, a part longer than
    255 bytes."""
    if not name:
        raise UnsafeName("empty name")
    if name.startswith("/"):
        raise UnsafeName(f"absolute name {name!r}")
    for part in name.split("/"):
        if part == "":
            raise UnsafeName(f"empty path part (//) in {name!r}")
        if part in (".", ".."):
            raise UnsafeName(f"{part!r} path part in {name!r}")
        if any(ord(c) < 32 or ord(c) == 127 for c in part):
            raise UnsafeName(f"control character in {name!r}")
        bad = sorted(set(part) & REFUSED_CHARACTERS)
        if bad:
            raise UnsafeName(f"character(s) {''.join(bad)!r} in {name!r}")
        if len(part.encode("utf-8", "surrogateescape")) > _MAX_PART_BYTES:
            raise UnsafeName(f"path part longer than {_MAX_PART_BYTES} bytes in {name!r}")
    return name


def path_inside(root: str | os.PathLike, name: str) -> Path:
    """``root / name`` once :func:`check_name` accepts ``name`` and the path, symlinks
    followed, lies inside ``root`` (a link planted in the output folder cannot redirect a
    write or a delete); UnsafeName otherwise."""
    path = Path(root) / check_name(name)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base) or path.resolve() == base:
        raise UnsafeName(f"{name!r} leads outside {root}")
    return path


def _new_temp_file(folder: Path, name: str, suffix: str) -> Path:
    """A new empty ``folder/.<name>.<random><suffix>``. Made with ``os.open`` and mode 0o666
    so the kernel applies the umask (``mkstemp`` makes 0600, which the rename would keep)."""
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name for {folder / name}")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write through (for writers that take a file
    name, e.g. a video encoder; ``suffix``: for writers that choose the format by it),
    renamed onto ``path`` when the block ends without error, deleted when it raises. A reader
    never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path.parent, path.name, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_writer(path: str | os.PathLike, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through (see :func:`atomic_path`). ``fsync``: flush
    it to disk before the rename, so the new file also survives a machine crash
    (checkpoints, stored objects)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` of ``array`` as bytes, never pickled (for :func:`atomic_write_bytes`, a
    shard member)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, fsync=fsync) as fh:
        fh.write(data)
