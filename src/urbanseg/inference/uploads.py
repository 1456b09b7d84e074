"""Reading one image upload of `urbanseg serve` safely: the size limit (declared and
counted), the stall timeout, multipart forms, and the pixel count from the image header
before anything is decoded. A refusal is a `Problem`: HTTP status, reason code, words."""

from __future__ import annotations

import asyncio
import io

from starlette.requests import ClientDisconnect, Request
from starlette.types import Message


class Problem(Exception):
    """A request the service refuses: HTTP status, a short reason code, and the reason in words."""

    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.headers = status, reason, detail, headers or {}


async def read_upload(request: Request, max_bytes: int, stall_timeout: float) -> bytes:
    """The image bytes: the raw body, or the one file of a multipart form. 413 when the
    declared or the counted size exceeds the limit, 408 when the client stalls."""
    declared = request.headers.get("content-length")
    too_big = f"the upload is larger than the server's limit of {max_bytes} bytes"
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise Problem(413, "upload_too_large", too_big + f" (Content-Length {declared})")
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), stall_timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise Problem(408, "upload_timeout", f"no data for {stall_timeout:g} s; send the whole upload") from None
        except ClientDisconnect:
            raise Problem(400, "client_closed", "the client closed the connection during the upload") from None
        size += len(chunk)
        if size > max_bytes:
            raise Problem(413, "upload_too_large", too_big)
        chunks.append(chunk)
    body = b"".join(chunks)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = await form_file(request, body)
    if not body:
        raise Problem(400, "empty_upload", "the request has no image: send its bytes as the body or as a form file")
    return body


async def form_file(request: Request, body: bytes) -> bytes:
    """The bytes of the single file in a multipart body (its client-side name is ignored)."""

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as e:  # python-multipart and Starlette raise several types for a malformed form
        raise Problem(400, "bad_form", f"cannot read the multipart form ({e})") from None
    files = [v for v in form.values() if not isinstance(v, str)]
    if len(files) != 1:
        raise Problem(
            400, "bad_form", f"the form holds {len(files)} files; send exactly one image (e.g. -F image=@a.png)"
        )
    data = await files[0].read()
    await form.close()
    return data


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image header, before anything is decoded: 400 for what is
    not an image, 413 for more than `max_pixels` (a decompression bomb is a few KB of PNG)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise Problem(413, "too_many_pixels", str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = "not a known image format" if isinstance(e, UnidentifiedImageError) else str(e)
        raise Problem(
            400, "not_an_image", f"the upload is not a readable image ({reason}); send PNG, JPEG, WebP, TIFF, BMP"
        ) from None
    if width * height > max_pixels:
        raise Problem(
            413,
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
    return width, height
