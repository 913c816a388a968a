"""Encoded images (PNG, JPEG) in datasets: an image folder read for publishing, and image bytes decoded with Pillow
into the pixel tensors a run's input_shape asks for.

Image bytes come from the network (a shard) and are untrusted: only PNG and JPEG are opened (Pillow's other
decoders are never reached), the pixel count is checked from the header before anything is decoded, and any
failure is one InvalidMessage naming the row.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from p2pcompute.errors import InvalidMessage, UsageError

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("PNG", "JPEG")
SUFFIXES = (".png", ".jpg", ".jpeg")
# A 4096x4096 photo is 16.8M pixels; beyond this an image is refused from its header (a decompression bomb would
# otherwise make every volunteer allocate gigabytes). Datasets of larger images should be resized when published.
MAX_PIXELS = 1 << 24
MODES = {1: "L", 3: "RGB"}  # input_shape channels -> the Pillow mode images are converted to
MAX_CLASSES = 1 << 16  # class folders in one image folder


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise InvalidMessage("decoding PNG/JPEG images needs Pillow (pip install 'p2pcompute[data]')") from None
    return Image


def is_image_folder(path: Path) -> bool:
    """A directory of class folders holding image files (not a `datasets` save_to_disk directory)."""
    return path.is_dir() and not (path / "dataset_info.json").exists() and any(p.is_dir() for p in path.iterdir())


def read_image_folder(path: Path, max_bytes: int) -> "pa.Table":
    """`path/<class>/<image>.png|.jpg`: a table of `image` (the file's bytes) and `label` (the class folder's index in
    sorted order), rows in (class, file name) order. Files are checked to be PNG or JPEG by their first bytes."""
    import pyarrow as pa

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if len(classes) > MAX_CLASSES:
        raise UsageError(f"{path}: {len(classes)} class folders, more than {MAX_CLASSES}")
    images, labels, total = [], [], 0
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in SUFFIXES or not file.is_file():
                continue
            data = file.read_bytes()
            total += len(data)
            if total > max_bytes:
                raise UsageError(f"{path}: more than {max_bytes} bytes of images")
            if not (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")):
                raise InvalidMessage(f"{file}: not a PNG or JPEG file")
            images.append(data)
            labels.append(label)
    if not images:
        raise UsageError(f"{path}: no .png/.jpg files in class folders ({', '.join(classes[:5])})")
    return pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())})


def decode_images(encoded: Sequence[bytes], shape: tuple[int, ...]) -> np.ndarray:
    """uint8 [rows, channels, height, width] from PNG/JPEG bytes, converted to the channels of `shape` (1: grey,
    3: RGB) and resized (bilinear) to its height and width when they differ."""
    if len(shape) != 3 or shape[0] not in MODES:
        raise InvalidMessage(f"encoded images need an input_shape [1 or 3, height, width], not {list(shape)}")
    Image = _pillow()
    channels, height, width = shape
    out = np.empty((len(encoded), channels, height, width), dtype=np.uint8)
    for row, data in enumerate(encoded):
        if data is None:
            raise InvalidMessage(f"image {row} is missing")
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise InvalidMessage(f"image {row} is {image.width}x{image.height}, above {MAX_PIXELS} pixels")
                image = image.convert(MODES[channels])
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # Pillow's errors for bad image bytes
            raise InvalidMessage(f"image {row} cannot be decoded: {str(e).splitlines()[0][:120]}") from None
        out[row] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return out
