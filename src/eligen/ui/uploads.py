"""What the page sends as files: an image to inpaint, a layout or PNG to load. Each arrives inside a JSON body as
a base64 data URI (so every state-changing request is ``application/json``), is decoded in memory under the
app's byte and pixel caps (nothing is written before it is known to be an image, and no message names a server
path), and the images to inpaint are kept under random ids for a while: at most ``KEPT_UPLOADS`` of them, none
older than ``UPLOAD_TTL_S``."""

from __future__ import annotations

import base64
import binascii
import io
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image

from .messages import refusal

KEPT_UPLOADS = 8  # images to inpaint kept at once; older ones are dropped (a queued job keeps its own copy)
UPLOAD_TTL_S = 3600.0
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what the page may send as an image


class UploadError(ValueError):
    """An upload the page must replace: ``problem`` is what the page shows."""

    def __init__(self, message: str, field: str = "image"):
        super().__init__(message)
        self.problem = refusal(message, field)


def file_bytes(body: Any, max_bytes: int) -> tuple[str, bytes]:
    """``{"name", "data": "data:<type>;base64,..."}`` -> (name, the file's bytes), refused above ``max_bytes``."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, str):
        raise UploadError("send the file as {\"name\": ..., \"data\": \"data:<type>;base64,...\"}")
    name = body.get("name")
    name = name if isinstance(name, str) else "file"
    header, comma, payload = data.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        raise UploadError("the file is not a base64 data URI")
    if len(payload) * 3 // 4 > max_bytes:
        raise UploadError(too_large(len(payload) * 3 // 4, max_bytes))
    try:
        return name[:200], base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError("the file's data is not valid base64") from None


def too_large(size: int, cap: int) -> str:
    return (f"the file is {size / 2**20:.1f} MiB, above this app's limit of {cap / 2**20:g} MiB; choose a smaller "
            "one")


def decode_image(raw: bytes, max_pixels: int) -> Image.Image:
    """An uploaded image decoded in memory as RGB, refused by its declared size before decoding."""
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as probe:  # no other decoder is ever reached
            width, height = probe.size
            if width * height > max_pixels:
                raise UploadError(f"the image is {width}x{height} ({width * height} pixels), above this app's limit "
                                  f"of {max_pixels} pixels; downscale it first")
            probe.load()
            return probe.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, UploadError):
            raise
        raise UploadError("the file is not an image this app can read (PNG, JPEG or WebP)") from None


class UploadStore:
    """Images to inpaint, kept in ``folder`` under random ids; the oldest go first, and none outlives its TTL."""

    def __init__(self, folder: Path, keep: int = KEPT_UPLOADS, ttl_s: float = UPLOAD_TTL_S):
        self.folder, self.keep, self.ttl_s = folder, keep, ttl_s
        self._files: OrderedDict[str, tuple[Path, float]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, image: Image.Image) -> str:
        upload_id = secrets.token_hex(8)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{upload_id}.png"
        image.save(path, format="PNG")
        with self._lock:
            self._files[upload_id] = (path, time.monotonic())
            self._expire()
        return upload_id

    def get(self, upload_id: str) -> Path | None:
        with self._lock:
            self._expire()
            entry = self._files.get(upload_id)
        return None if entry is None else entry[0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def _expire(self) -> None:
        now = time.monotonic()
        for upload_id, (path, added) in list(self._files.items()):
            if len(self._files) > self.keep or now - added > self.ttl_s:
                del self._files[upload_id]
                path.unlink(missing_ok=True)
