"""Input images: validation before a run is accepted, lazy decoding on runners.

The web server checks an image from its header and trailer only (format, size,
pixel count, truncation), which costs microseconds; runners decode pixels the
first time a step needs them, so a workflow that reads only the image size
never decodes at all.
"""

import base64
import binascii
import io
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import pybase64
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from workflows.errors import InputError, UndecodableImageError

# Formats with a cheap structural end-of-file check; others are fully decoded
# by the web server to find truncation.
_TRAILERS = {
    "JPEG": (b"\xff\xd9",),
    "PNG": (b"IEND\xaeB`\x82",),
}
# OpenCV refuses to decode images with a longer side (CV_IO_MAX_IMAGE_WIDTH
# and _HEIGHT default to 2**20); this lower bound keeps images decodable.
MAX_IMAGE_SIDE = 1 << 16
ALLOWED_FORMATS = {"JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF"}

# inspect_image checks GLASSBOX["MAX_IMAGE_PIXELS"] against the size in the
# header before any pixels are decoded.  Pillow's own decompression-bomb limit
# is turned off in every process that imports this module, because it would
# reject larger images as "not an image" and cap the configured limit.  In
# Pillow 12.3 that limit warns above 89,478,485 pixels and raises above twice
# that.
Image.MAX_IMAGE_PIXELS = None


# EXIF's Orientation tag (274). Values 5 to 8 turn the image by 90 degrees,
# so the displayed width is the stored height.
ORIENTATION_TAG = 0x0112
# Formats whose EXIF orientation is applied here. Roboflow's inference server
# decodes with cv2.IMREAD_COLOR unless DISABLE_PREPROC_AUTO_ORIENT is set,
# and OpenCV 4.12 then applies it to these formats but not to WebP. In TIFF,
# OpenCV and Pillow both apply the Orientation tag themselves, so nothing is
# left to do.
_EXIF_ORIENTED_FORMATS = {"JPEG", "PNG"}


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


# The standard base64 alphabet with its padding.
_BASE64_CHARACTERS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
)
# The URL-safe alphabet's two characters, and the standard ones they stand for.
_URL_SAFE = str.maketrans("-_", "+/")


def decode_base64(
    value: str, *, input_name: str, field_name: str | None = None
) -> bytes:
    """Decode base64 or raise InputError.

    A base64 data-URL prefix (its scheme in any case), line breaks and other
    whitespace (as ``base64`` and MIME encoders write them), missing
    trailing padding and the URL-safe alphabet (``-`` and ``_`` for ``+``
    and ``/``) are accepted. The error for any other character names it
    and its position.
    """
    field = field_name or input_name
    if value.lstrip()[:5].lower() == "data:":
        value = _data_url_payload(value, input_name=input_name, field_name=field)
    try:
        # pybase64 decodes with SIMD instructions: 7 us for a 97 kB image on
        # a 2-core Xeon VM, against 320 us for the standard library. It is
        # stricter about surplus padding, which the lenient path accepts.
        return pybase64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        # Copying out the whitespace costs about 80 µs for a 100 kB image,
        # so only values that fail as they are pay it.
        text = "".join(value.split())
        if ("-" in text or "_" in text) and not ("+" in text or "/" in text):
            text = text.translate(_URL_SAFE)
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError(
            f"Input '{input_name}' is not valid base64: "
            f"{_base64_problem(value, error)}",
            context="input_decoding",
            field_name=field,
            hint="Send the image file's bytes encoded with base64, standard or "
            "URL-safe, optionally after a data: URL prefix.",
        ) from error


def _data_url_payload(value: str, *, input_name: str, field_name: str) -> str:
    """Return the data of a base64 data URL, or raise InputError.

    RFC 2397 reads the data of a data URL without ``;base64`` as
    percent-encoded bytes. Such a URL is rejected rather than decoded,
    because image clients send base64, and Roboflow's ``inference`` server
    strips only a ``data:image/<type>;base64,`` prefix.
    """
    header, comma, payload = value.lstrip().partition(",")
    parameters = header.split(";")[1:]
    if comma and parameters and parameters[-1].strip().lower() == "base64":
        return payload
    start = header + comma
    if len(start) > 40:
        start = start[:39] + "…"
    start = json.dumps(start, ensure_ascii=False)
    if comma:
        problem = (
            f"has no ';base64' before its ',' (it starts {start}), so its data "
            "would be percent-encoded bytes, which are not accepted"
        )
    else:
        problem = f"has no ',' before its data (it starts {start})"
    raise InputError(
        f"Input '{input_name}' is a data URL that {problem}",
        context="input_decoding",
        field_name=field_name,
        hint="Send the image file's bytes encoded with base64, alone or after "
        "a prefix such as 'data:image/jpeg;base64,'.",
    )


def _base64_problem(value: str, error: Exception) -> str:
    """Say what is wrong with ``value``: its first foreign character, if any."""
    mixed = ("-" in value or "_" in value) and ("+" in value or "/" in value)
    for position, character in enumerate(value):
        if character.isspace() or character in _BASE64_CHARACTERS:
            continue
        if character in "-_" and not mixed:
            continue
        if mixed and character in "-_":
            return (
                f"it mixes the URL-safe alphabet ({character!r} at offset "
                f"{position} of the base64 data) with the standard one ('+' or '/')"
            )
        return (
            f"character {character!r} at offset {position} of the base64 data "
            "is not in the base64 alphabet"
        )
    padding = value.find("=")
    if padding >= 0 and value[padding:].strip(" \t\r\n\f\v="):
        return (
            f"padding '=' at offset {padding} of the base64 data is followed by "
            "more data; '=' may only end it"
        )
    return str(error)


def inspect_image(
    data: bytes,
    *,
    input_name: str,
    max_pixels: int,
    complete: bool = True,
    field_name: str | None = None,
) -> ImageInfo:
    """Check that ``data`` is an image no larger than ``max_pixels``.

    Messages name the image ``input_name`` (``image[2]`` in a batch), and
    errors carry ``field_name``, by default the same.

    With ``complete``, also check that the file is whole (check_complete),
    which decodes formats without an end marker.
    """
    field = field_name or input_name
    if not data:
        raise InputError(
            f"Input '{input_name}' is empty",
            context="input_decoding",
            field_name=field,
        )
    not_an_image = InputError(
        f"Input '{input_name}' is not an image in a supported format "
        f"({', '.join(sorted(ALLOWED_FORMATS))})",
        context="input_decoding",
        field_name=field,
    )
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # Pillow's message adds only the repr of the buffer it read.
        raise not_an_image from None
    except Exception as error:
        problem = _png_metadata_problem(data)
        if problem is not None:
            # The pixels need no metadata, and OpenCV on a runner would decode
            # them. The file is still rejected: Pillow's limits are what keeps
            # a chunk of a few kB from inflating to gigabytes here, and with
            # the file rejected no process inflates more of a chunk than that.
            raise InputError(
                f"Input '{input_name}' is a PNG file whose {problem}",
                context="input_decoding",
                field_name=field,
                hint="Remove the image's text metadata and ICC profile, for "
                "example by saving it again without them, and send it again.",
            ) from error
        # Pillow opens a WebP file by decoding it, so a cut or damaged one
        # fails here rather than in the completeness check below.
        webp_size = _webp_file_size(data)
        if webp_size is None:
            raise not_an_image from error
        if len(data) < webp_size:
            message = (
                f"Input '{input_name}' is a truncated WEBP file ({len(data)} of "
                f"the {webp_size} bytes that its RIFF header gives)"
            )
        else:
            message = f"Input '{input_name}' could not be decoded as WEBP"
        raise InputError(message, context="input_decoding", field_name=field) from error
    image_format = image.format or "unknown"
    if image_format not in ALLOWED_FORMATS:
        raise InputError(
            f"Input '{input_name}' is an image in {image_format} format; supported "
            f"formats are {', '.join(sorted(ALLOWED_FORMATS))}",
            context="input_decoding",
            field_name=field,
        )
    bits = _tiff_bits_per_sample(image) if image_format == "TIFF" else 8
    if bits > 16:
        # Pillow reads these, OpenCV on the runners does not.
        raise InputError(
            f"Input '{input_name}' is a TIFF image with {bits}-bit samples, which "
            "the runners cannot decode",
            context="input_decoding",
            field_name=field,
            hint="Convert it to 8 or 16 bits per sample.",
        )
    width, height = image.size
    if exif_orientation(image, data) >= 5:
        width, height = height, width
    if max(width, height) > MAX_IMAGE_SIDE:
        raise InputError(
            f"Input '{input_name}' is {width}x{height}; a side may be at most "
            f"{MAX_IMAGE_SIDE} pixels",
            context="input_decoding",
            field_name=field,
        )
    if width * height > max_pixels:
        raise InputError(
            f"Input '{input_name}' is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels}",
            context="input_decoding",
            field_name=field,
            hint="Resize the image before sending it.",
        )
    if complete:
        _check_complete(image, image_format, data, input_name, field)
    return ImageInfo(format=image_format, width=width, height=height)


def exif_orientation(image: Image.Image, data: bytes) -> int:
    """Return the EXIF Orientation (1 to 8) that decoding applies to ``image``.

    ``image`` is ``data`` opened with Pillow. Returns 1, upright, for formats
    outside _EXIF_ORIENTED_FORMATS, for images without the tag, and for
    EXIF data or values that do not parse, which OpenCV skips too.
    """
    if image.format not in _EXIF_ORIENTED_FORMATS:
        return 1
    if image.format == "PNG":
        # Pillow reads an eXIf chunk after the pixel data only when it
        # decodes them, and OpenCV reads it wherever it is.
        raw = _png_exif_chunk(data)
    else:
        raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
        value = exif.get(ORIENTATION_TAG, 1)
    # Pillow raises many exception types on malformed EXIF data.
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """Yield the type, data offset and length of a PNG file's chunks up to IEND.

    The walk follows each chunk's length, so it stops at the IEND chunk
    whatever bytes follow it, and at the end of ``data`` if a chunk runs past.
    """
    offset = 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        yield kind, offset + 8, length
        if kind == b"IEND":
            return
        # Chunk length, type, data and CRC.
        offset += 12 + length


def _png_exif_chunk(data: bytes) -> bytes | None:
    """Return the data of a PNG file's eXIf chunk, or None if it has none."""
    for kind, start, length in _png_chunks(data):
        if kind == b"eXIf":
            return data[start : start + length]
    return None


# The chunks that make a PNG file an animated PNG (APNG).
_APNG_CHUNKS = frozenset({b"acTL", b"fcTL", b"fdAT"})


def _without_animation(data: bytes) -> bytes:
    """Return a PNG file without its APNG chunks: the plain PNG of its default image.

    OpenCV 4.12 decodes an APNG through its own frame reader, and some
    malformed APNGs, such as one whose first frame is smaller than its IHDR
    image, make that reader crash the process (SIGSEGV) instead of failing.
    libpng decodes the plain PNG or fails cleanly, and its pixels are the
    IDAT image that OpenCV returns for a valid APNG. Other data, including
    PNG files without these chunks, is returned as it is.
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n" or b"acTL" not in data:
        return data
    plain = [data[:8]]
    animated = False
    for kind, start, length in _png_chunks(data):
        if kind in _APNG_CHUNKS:
            animated = True
        else:
            # Chunk length and type, data and CRC. Bytes after IEND, which
            # decoders ignore, are left out.
            plain.append(data[start - 8 : start + length + 4])
    if not animated:
        return data
    return b"".join(plain)


# PNG chunks whose data Pillow inflates while opening the file, as it reads
# the chunks before the first IDAT.
_PNG_COMPRESSED_METADATA = frozenset({b"zTXt", b"iCCP", b"iTXt"})
_PNG_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt"})


def _png_metadata_problem(data: bytes) -> str | None:
    """Return which metadata limit of Pillow a PNG file exceeds, or None.

    Pillow (12.3, PngImagePlugin) rejects a file with a ValueError when one
    zTXt, iCCP or iTXt chunk inflates past MAX_TEXT_CHUNK, or its text chunks
    past MAX_TEXT_MEMORY together. Inflating stops just past each limit.
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    chunk_limit = PngImagePlugin.MAX_TEXT_CHUNK
    text_limit = PngImagePlugin.MAX_TEXT_MEMORY
    text_bytes = 0
    for kind, start, length in _png_chunks(data):
        if kind == b"IDAT":
            return None
        if kind not in _PNG_TEXT_CHUNKS and kind not in _PNG_COMPRESSED_METADATA:
            continue
        chunk = data[start : start + length]
        size = _png_chunk_text_size(kind, chunk, chunk_limit)
        if size > chunk_limit:
            return (
                f"{kind.decode()} metadata chunk inflates to more than "
                f"{chunk_limit} bytes, the limit on one metadata chunk"
            )
        if kind in _PNG_TEXT_CHUNKS:
            text_bytes += size
        if text_bytes > text_limit:
            return (
                f"text metadata chunks inflate to more than {text_limit} bytes "
                "together, the limit on a file's text metadata"
            )
    return None


def _png_chunk_text_size(kind: bytes, chunk: bytes, limit: int) -> int:
    """Return the size of a metadata chunk's text or profile, at most ``limit`` + 1.

    A compressed value that does not inflate counts as 0, as Pillow drops it.
    """
    _, _, value = chunk.partition(b"\0")
    if kind == b"tEXt":
        return len(value)
    if kind == b"iTXt":
        # A compression flag and method, then the language tag and the
        # translated keyword before the text.
        flag, method = value[:1], value[1:2]
        value = value[2:].split(b"\0", 2)[-1]
        if flag in (b"", b"\0"):
            return len(value)
        if method != b"\0":
            return 0
    else:
        # zTXt and iCCP: a compression method byte, then the zlib stream.
        value = value[1:]
    inflater = zlib.decompressobj()
    try:
        inflated = inflater.decompress(value, limit + 1)
    except zlib.error:
        return 0
    return len(inflated)


def _png_has_end(data: bytes) -> bool:
    """Return whether a PNG file's chunks lead to a whole IEND chunk."""
    for kind, start, _ in _png_chunks(data):
        if kind == b"IEND":
            return data[start - 4 : start + 4] == _TRAILERS["PNG"][0]
    return False


def _webp_file_size(data: bytes) -> int | None:
    """Return the file size that a WebP file's RIFF header gives, or None
    when ``data`` does not start like a WebP file."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    # The RIFF chunk size counts the bytes after its own 8-byte header.
    return int.from_bytes(data[4:8], "little") + 8


def _tiff_bits_per_sample(image: Image.Image) -> int:
    """Return the largest BitsPerSample (TIFF tag 258) of a TIFF image's channels."""
    bits = image.tag_v2.get(258, 8)
    return max(bits) if isinstance(bits, tuple) else int(bits)


def check_complete(
    data: bytes, info: ImageInfo, *, input_name: str, field_name: str | None = None
) -> None:
    """Raise InputError if the image inspect_image read from ``data`` is cut short."""
    # Formats with an end marker are checked on the bytes alone.
    image = None if info.format in _TRAILERS else Image.open(io.BytesIO(data))
    _check_complete(image, info.format, data, input_name, field_name or input_name)


def _has_end_marker(image_format: str, data: bytes) -> bool:
    if image_format == "JPEG":
        # The main image's end-of-image marker must follow its first
        # start-of-scan; cameras may append data after it (motion photos), and
        # an EXIF thumbnail before the scan carries an end marker of its own.
        start_of_scan = data.find(b"\xff\xda")
        return start_of_scan != -1 and data.rfind(b"\xff\xd9") > start_of_scan
    if any(marker in data[-64:] for marker in _TRAILERS[image_format]):
        return True
    # Tools may append data after a PNG file's IEND chunk, which OpenCV and
    # Pillow ignore. Walking the chunks finds IEND there, and costs one step per
    # chunk, so it runs only when the end of the file has no IEND.
    return _png_has_end(data)


def _check_complete(
    image: Image.Image | None, image_format: str, data: bytes, name: str, field: str
):
    if image_format in _TRAILERS:
        if _has_end_marker(image_format, data):
            return
        raise InputError(
            f"Input '{name}' is a truncated {image_format} file (no end marker)",
            context="input_decoding",
            field_name=field,
        )
    try:
        image.load()
    except Exception as error:
        raise InputError(
            f"Input '{name}' could not be decoded as {image_format}",
            context="input_decoding",
            field_name=field,
        ) from error


@dataclass
class WorkflowImage:
    """An image flowing through a workflow: raw bytes, pixels decoded on demand.

    ``origin`` is the offset of this image's top-left corner in the root input
    image, so crop-level detections can be mapped back to parent coordinates.
    """

    parent_id: str
    width: int
    height: int
    data: bytes | None = None
    _pixels: np.ndarray | None = field(default=None, repr=False)
    origin: tuple[int, int] = (0, 0)
    root_size: tuple[int, int] | None = None
    # The input image this one was cut from; None for an input itself.
    root_id: str | None = None
    # Offset x, offset y, width and height of the image this one was cut
    # from, in that image's pixels; None for an input itself.
    parent_origin: tuple[int, int, int, int] | None = None

    @property
    def root(self) -> str:
        """Return the id of the input image at the root of this image."""
        return self.root_id or self.parent_id

    @classmethod
    def from_bytes(cls, data: bytes, parent_id: str) -> "WorkflowImage":
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if exif_orientation(image, data) >= 5:
            width, height = height, width
        return cls(parent_id=parent_id, width=width, height=height, data=data)

    @classmethod
    def from_pixels(
        cls,
        pixels: np.ndarray,
        parent_id: str,
        origin: tuple[int, int] = (0, 0),
        root_size: tuple[int, int] | None = None,
        root_id: str | None = None,
        parent_origin: tuple[int, int, int, int] | None = None,
    ) -> "WorkflowImage":
        height, width = pixels.shape[:2]
        return cls(
            parent_id=parent_id,
            width=width,
            height=height,
            _pixels=pixels,
            origin=origin,
            root_size=root_size,
            root_id=root_id,
            parent_origin=parent_origin,
        )

    @property
    def pixels(self) -> np.ndarray:
        """BGR uint8 array of shape (height, width, 3), decoded on first use.

        The pixels are turned upright by the image's EXIF orientation, as
        inspect_image turned the width and height it read from the header.
        """
        if self._pixels is None:
            assert self.data is not None
            # exif_orientation decides the orientation, not OpenCV, so that
            # the pixels always match the size read from the header.
            decoded = cv2.imdecode(
                np.frombuffer(_without_animation(self.data), dtype=np.uint8),
                cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
            )
            if decoded is None:
                raise UndecodableImageError(
                    f"Image '{self.parent_id}' could not be decoded, although its "
                    "header and end marker were valid",
                    context="input_decoding",
                )
            orientation = exif_orientation(Image.open(io.BytesIO(self.data)), self.data)
            self._pixels = _turn_upright(decoded, orientation)
        return self._pixels

    def to_jpeg_base64(self, quality: int = 90) -> str:
        ok, encoded = cv2.imencode(
            ".jpg", self.pixels, [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for image '{self.parent_id}'")
        return base64.b64encode(encoded.tobytes()).decode("ascii")


def _turn_upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF ``orientation`` (1 to 8) to stored ``pixels``."""
    if orientation == 2:
        return cv2.flip(pixels, 1)
    if orientation == 3:
        return cv2.rotate(pixels, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(pixels, 0)
    if orientation == 5:
        return cv2.transpose(pixels)
    if orientation == 6:
        return cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(pixels), -1)
    if orientation == 8:
        return cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return pixels
