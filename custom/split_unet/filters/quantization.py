"""Activation quantisation at the site: fewer bytes on the wire and coarser activations to invert."""

from __future__ import annotations

from nvflare.apis.fl_context import FLContext

from split_unet.protocol.codecs import CODECS
from split_unet.protocol.wire import KIND_ACTIVATIONS, TensorMessage

from .base import TensorMessageFilter


class ActivationQuantization(TensorMessageFilter):
    """Re-encode the activations with ``codec`` (``float16``, ``int8`` per channel, or ``topk`` keeping
    ``keep_fraction`` of the entries). The server decodes any codec; the bytes it receives are measured
    (``bytes_per_step`` in ``summary.json``), so the saving shows there."""

    kinds = (KIND_ACTIVATIONS,)

    def __init__(self, codec: str = "int8", keep_fraction: float = 0.1):
        super().__init__()
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        self.codec = codec
        self.keep_fraction = keep_fraction

    def output_codec(self, encodings: dict) -> str:
        return self.codec

    def transform(self, message: TensorMessage, fl_ctx: FLContext) -> TensorMessage | None:
        return message if message.tensors else None
