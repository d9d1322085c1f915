"""Tensor codecs of the wire format: how one level's tensor becomes raw bytes and back.

- ``float32``: exact.
- ``float16``: ``x / max|x|`` in float16, so tensors far smaller than float16's smallest normal number
  (6e-5), such as gradients of a mean loss over many voxels, keep their precision. Half the bytes.
- ``int8``: per-channel scale (channel = axis 1), values rounded to [-127, 127]. A quarter of the bytes;
  error at most half a quantisation step, ``max|x_c| / 254`` per channel.
- ``topk``: only the ``keep_fraction`` largest-magnitude entries, as float16 values plus int32 flat
  indices; the rest decode as 0.

Each array travels as the contiguous little-endian bytes of the codec's dtype (``DTYPES``); the header
(in the DXO meta) carries codec, shape and scale. Raw bytes, not numpy arrays: NVFlare 2.9's FOBS sends a
numpy array through its download service (``np.save`` per array and a pull of 2 MB chunks per message), and
bytes are carried in the message itself (measured in ``docs/performance.md``). The receiver checks
every byte count against the declared shape before it allocates anything. Conversions to and from float16
run in torch, whose vectorised casts are several times faster than numpy's.

Lossless compression (``COMPRESSIONS``, ``header["compression"]``) is chosen by the sender per message; sites
compress their activations when ``TrainConfig.activation_compression`` says so (off by default). ``zstd`` (Zstandard
level 1) shrinks activations to about 0.36 of their float16 bytes, because a skull-stripped volume's background makes
every level's outer voxels constant, for about 0.1 CPU s per 45 MB at both ends together. Measured on one machine
(loopback, ``docs/performance.md``) it saves no CPU: the federation's CPU per step was the same within
run-to-run noise in POC and 0.2 s higher in the simulator. It is for links slower than the machine's memory, where
the 2.7x fewer bytes from site to server are wall time. Gradients shrink only to about 0.9 and are never compressed.
A receiver reads the decompressed size from the frame header and refuses any above the declared shape's bytes before
it decompresses.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
import zstandard

from split_unet.errors import ProtocolError
from split_unet.ids import is_integer, is_number

CODECS = ("float32", "float16", "int8", "topk")
COMPRESSIONS = ("zstd",)
ZSTD_LEVEL = 1  # level 3 compresses the activations no further (0.36 either way) at 1.7x the CPU
INDICES_SUFFIX = ":indices"
# Largest tensor a receiver accepts (elements; 1 GiB as float32): a declared shape beyond it is refused
# before the top-k codec allocates its dense tensor or any codec converts to float32.
MAX_ELEMENTS = 2**28
MAX_DIMS = 8  # a U-Net level is (batch, channels, *spatial) with at most 3 spatial axes
MAX_SCALE = float(np.finfo(np.float32).max)  # also refuses NaN and ints too large for a float
# The dtype of each codec's values on the wire (little-endian); top-k adds int32 indices.
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1"), "topk": np.dtype("<f2")}
INDICES_DTYPE = np.dtype("<i4")


def check_compression(compression: object, name: str = "compression") -> None:
    """The one rule for a sender's compression setting: None or one of ``COMPRESSIONS``."""
    if compression is not None and compression not in COMPRESSIONS:
        raise ValueError(f"{name} must be None or one of {COMPRESSIONS}, got {str(compression)[:40]!r}")


def encode(tensor: torch.Tensor, codec: str, keep_fraction: float = 0.1,
           compression: str | None = None) -> tuple[dict[str, bytes], dict]:
    """Tensor -> ({"": main bytes, ":indices": ...}, header with codec, scale, shape and any compression)."""
    check_compression(compression)
    arrays, header = _encode_arrays(tensor, codec, keep_fraction)
    arrays = {suffix: np.ascontiguousarray(array, DTYPES[codec] if not suffix else INDICES_DTYPE)
              for suffix, array in arrays.items()}
    if compression is None:
        return {suffix: array.tobytes() for suffix, array in arrays.items()}, header
    header["compression"] = compression
    # One compressor per call: a ZstdCompressor must not be shared by threads, and making one costs microseconds.
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return {suffix: compressor.compress(array) for suffix, array in arrays.items()}, header  # no tobytes copy


def _encode_arrays(tensor: torch.Tensor, codec: str, keep_fraction: float) -> tuple[dict[str, np.ndarray], dict]:
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    tensor = tensor.detach().to("cpu", torch.float32)
    values = tensor.numpy()
    header = {"codec": codec, "shape": list(values.shape), "scale": 1.0}
    if codec == "float32":
        return {"": values}, header
    if codec == "int8":
        axes = tuple(a for a in range(values.ndim) if a != 1)
        peaks = np.abs(values).max(axis=axes, keepdims=True) if values.size else np.ones(1)
        scales = np.where(peaks > 0, peaks / 127.0, 1.0).astype(np.float32)
        header["scale"] = scales.reshape(-1).tolist()
        return {"": np.clip(np.rint(values / scales), -127, 127).astype(np.int8)}, header
    # max|x| from one min/max pass: no temporary |x| tensor as large as the input
    peak = max(-float((bounds := torch.aminmax(tensor)).min), float(bounds.max)) if values.size else 0.0
    header["scale"] = peak if peak > 0 and math.isfinite(peak) else 1.0
    if codec == "float16":  # scaled straight into the float16 result: no float32 intermediate
        return {"": torch.div(tensor, header["scale"], out=torch.empty_like(tensor, dtype=torch.float16)).numpy()}, \
            header
    flat = values.reshape(-1)
    keep = min(flat.size, max(1, math.ceil(keep_fraction * flat.size)))
    indices = np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep:].astype(np.int32)
    indices.sort()
    return {"": (flat[indices] / header["scale"]).astype(np.float16), INDICES_SUFFIX: indices}, header


def decode(arrays: Mapping[str, object], header: object, *, site: str | None, field_name: str,
           max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Checked inverse of ``encode``: refuses unknown codecs, byte counts that do not match the declared shape,
    a declared shape of more than ``max_elements`` elements, bad scales, NaN and Inf (also after scaling, which
    can overflow)."""
    def fail(message: str, suffix: str = "") -> ProtocolError:
        return ProtocolError(message, site=site, field=field_name + suffix)

    if not isinstance(header, Mapping) or header.get("codec") not in CODECS:
        raise fail(f"unknown encoding {header!r}", ".encoding")
    codec, shape, scale = header["codec"], header.get("shape"), header.get("scale")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
            not all(is_integer(s) and s >= 0 for s in shape):
        raise fail(f"invalid shape {str(shape)[:80]}", ".shape")
    numel = math.prod(shape)
    if numel > max_elements:
        raise fail(f"declared shape {shape} has {numel} elements, more than the limit of {max_elements}", ".shape")
    # Every dimension too: with a zero elsewhere the product stays small, but numpy refuses such a shape
    # (top-k reshapes its dense tensor to it).
    if max(shape, default=0) > max(max_elements, 1):
        raise fail(f"declared shape {str(shape)[:80]} has a dimension of more than the limit of {max_elements}",
                   ".shape")
    # Scales before any value is read: int8 has one per channel, the other codecs one number.
    scales = scale if codec == "int8" and isinstance(scale, list) else [scale]
    if not all(is_number(s) and 0 < s <= MAX_SCALE for s in scales):
        raise fail(f"invalid scale {scale!r}", ".scale")
    if codec == "int8" and (len(shape) < 2 or len(scales) != shape[1]):
        raise fail(f"int8 needs one scale per channel, got {len(scales)}", ".scale")
    arrays = _decompressed(arrays, header.get("compression"), numel, DTYPES[codec], fail)
    count = None if codec == "topk" else numel  # top-k: as many values as indices, at most the shape's size
    array = _received_array(arrays.get(""), DTYPES[codec], count, fail)
    with warnings.catch_warnings(), np.errstate(over="ignore"):  # an overflow is refused just below
        warnings.simplefilter("ignore", UserWarning)  # a received buffer is read-only; it is only read
        tensor = _dense(codec, array, arrays, shape, scales, fail)
    # One pass over the decoded tensor: min and max are NaN if any entry is, and infinite if any entry is (an
    # entry itself or an overflow of its scaling); the cause is looked up only on failure.
    low, high = torch.aminmax(tensor) if tensor.numel() else (torch.zeros(()), torch.zeros(()))
    if not (torch.isfinite(low) and torch.isfinite(high)):
        if bad := int((~np.isfinite(array.astype(np.float32))).sum()):
            raise fail(f"contains {bad} NaN/Inf values")
        raise fail(f"scale {scale!r} overflows float32", ".scale")
    return tensor


def _decompressed(arrays: Mapping[str, object], compression: object, numel: int, dtype: np.dtype,
                  fail: Callable[..., ProtocolError]) -> Mapping[str, object]:
    """The received fields as sent before compression. Each frame must declare its decompressed size, at most the
    bytes of ``numel`` values (of ``dtype``, or of the top-k indices): checked before anything is allocated."""
    if compression is None:
        return arrays
    if compression not in COMPRESSIONS:
        raise fail(f"unknown compression {str(compression)[:40]!r}", ".compression")
    decompressor = zstandard.ZstdDecompressor()
    fields = {}
    for suffix, value in arrays.items():
        if not isinstance(value, (bytes, bytearray)):
            raise fail(f"expected compressed bytes, got {type(value).__name__}", suffix)
        limit = numel * (INDICES_DTYPE if suffix else dtype).itemsize
        try:
            size = zstandard.frame_content_size(value)
            if not 0 <= size <= limit:
                raise fail(f"a compressed frame declares {size} bytes; the declared shape allows at most {limit}",
                           suffix)
            fields[suffix] = decompressor.decompress(value, allow_extra_data=False)
        except zstandard.ZstdError as error:
            raise fail(f"corrupt {compression} data: {error}", suffix) from None
    return fields


def _received_array(value: object, dtype: np.dtype, count: int | None, fail: Callable[..., ProtocolError],
                    suffix: str = "", counted: str = "the declared shape") -> np.ndarray:
    """A read-only view of received bytes as the ``count`` values of ``dtype`` that ``counted`` asks for (any whole
    number of values when ``count`` is None); the byte count is checked before anything is read or allocated."""
    if not isinstance(value, (bytes, bytearray)):
        raise fail(f"expected the bytes of {dtype.name} values, got {type(value).__name__}", suffix)
    if count is None and len(value) % dtype.itemsize:
        raise fail(f"{len(value)} bytes are not whole {dtype.name} values", suffix)
    if count is not None and len(value) != count * dtype.itemsize:
        raise fail(f"{len(value)} bytes, not the {count} {dtype.name} values of {counted}", suffix)
    return np.frombuffer(value, dtype)


def _dense(codec: str, array: np.ndarray, arrays: Mapping[str, object], shape: list[int], scales: list,
           fail: Callable[..., ProtocolError]) -> torch.Tensor:
    """The decoded float32 tensor of a header and byte count already checked by ``decode``."""
    numel = math.prod(shape)
    if codec == "topk":
        if array.size > numel:
            raise fail(f"top-k sends {array.size} values for a shape of {numel} elements")
        indices = _received_array(arrays.get(INDICES_SUFFIX), INDICES_DTYPE, array.size, fail, INDICES_SUFFIX,
                                  "the top-k values")
        if indices.size and (indices.min() < 0 or indices.max() >= numel):
            raise fail("top-k index out of range", INDICES_SUFFIX)
        dense = np.zeros(numel, np.float32)
        dense[indices] = array.astype(np.float32) * np.float32(scales[0])
        return torch.from_numpy(dense.reshape(shape))
    received = torch.from_numpy(array).reshape(shape)
    if codec == "int8":
        view = [1] * len(shape)
        view[1] = shape[1]
        return received.to(torch.float32).mul_(torch.tensor(scales, dtype=torch.float32).reshape(view))
    if received.dtype == torch.float32:
        return received * float(scales[0])  # a new tensor: the received buffer is left as it is
    return received.to(torch.float32).mul_(float(scales[0]))  # the converted copy, scaled in place


def round_trip(tensor: torch.Tensor, codec: str) -> torch.Tensor:
    """What a receiver decodes of ``tensor`` sent with ``codec``: the wire's precision, for studies that replay it."""
    arrays, header = encode(tensor, codec)
    return decode(arrays, header, site=None, field_name="round trip")


def nbytes(values: Mapping[str, bytes]) -> int:
    return sum(len(v) for v in values.values())
