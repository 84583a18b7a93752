"""Writing files so that no reader ever sees half of one: a temporary file beside the target, renamed over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc`` on Linux; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failure(path: Path, exc: BaseException) -> ValueError | None:
    """One line for a write that the system refused (disk full, read-only or forbidden folder, a file that
    safetensors could not write), naming the path and why; None for any other error."""
    if isinstance(exc, OSError):
        return ValueError(f"cannot write {path}: {exc.strerror or exc}; free space or choose another folder")
    if type(exc).__name__ == "SafetensorError":  # safetensors' own I/O error (not an OSError)
        return ValueError(f"cannot write {path}: {exc}; free space or choose another folder")
    return None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (created if missing); when the block succeeds the file gets the
    permissions a new file gets under the user's umask and replaces ``path``; when it fails it is removed and
    ``path`` is untouched. A write the system refuses (disk full, read-only folder) is a ``ValueError`` naming
    ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except Exception as exc:
        failure = write_failure(path, exc)
        if failure is None:
            raise
        raise failure from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex): how a record names an input so that it is found again anywhere."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_utf8(path: str | Path, what: str = "file") -> str:
    """A text file's contents; a file that is not UTF-8 is refused naming the file, the line and the column."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(f"{what} {path}, line {line}, column {column}: not UTF-8 text (byte "
                         f"0x{data[exc.start]:02x}); save it as UTF-8") from None


MAX_IMAGE_PIXELS = 64 * 2**20  # 64 MP: far above any model's working size, far below what exhausts memory


def open_image(path: str | Path | BinaryIO, what: str = "image"):
    """An image file (or the bytes of an inline data URI, as a binary stream) opened and fully decoded (a PIL
    image). Refused by its declared size before decoding (a decompression bomb costs nothing), and named when
    truncated or not an image."""
    from PIL import Image

    name = f"{what} {path}" if isinstance(path, (str, Path)) else f"inline {what} (data URI)"
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"the {name} is {width}x{height} ({width * height / 2**20:.0f} MP), above the "
                                 f"{MAX_IMAGE_PIXELS // 2**20} MP eligen decodes; downscale it first")
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"the {name} does not exist") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"the {name} is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"the {name} cannot be read (truncated or not an image: {exc})") from None


def open_data_uri(uri: str, what: str = "image"):
    """A ``data:image/<format>;base64,<data>`` URI decoded as a file is (:func:`open_image`, the same pixel cap)."""
    import base64
    import binascii
    import io

    header, _, payload = uri.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError(f"an inline {what} is data:image/<format>;base64,<data>, got one starting "
                         f"{header[:40]!r}")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the inline {what} (data URI) is not valid base64 ({exc})") from None
    return open_image(io.BytesIO(data), what)
