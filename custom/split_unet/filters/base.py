"""What every Split-U-Net filter shares: it touches only the payloads it understands.

A site privacy policy runs its filters on every task of every job, so a filter must pass anything that
is not a Split-U-Net tensor message of its kind through untouched: NVFlare's own messages, other jobs'
payloads, plain replies and error replies.
"""

from __future__ import annotations

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from split_unet.protocol.wire import TensorMessage


class TensorMessageFilter(Filter):
    """Filter base: ``transform`` sees decoded messages of ``kinds`` only; everything else passes as is."""

    kinds: tuple[str, ...] = ()

    keep_fraction = 0.1

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except Exception:  # not a DXO: not ours
            return shareable
        if dxo.data_kind not in self.kinds:
            return shareable
        message = TensorMessage.from_shareable(shareable, dxo.data_kind, site=fl_ctx.get_identity_name())
        transformed = self.transform(message, fl_ctx)
        if transformed is None:
            return shareable
        # Re-encode with the codec the message arrived in unless the filter chooses one; NVFlare's headers
        # (return code, task id, peer properties) stay as they were.
        codec = self.output_codec(dxo.meta.get("encodings", {}))
        transformed.to_dxo(codec, self.keep_fraction)[0].update_shareable(shareable)
        return shareable

    def output_codec(self, encodings: dict) -> str:
        """The codec the message arrived in (float32 when it had no tensors)."""
        codecs = {header.get("codec") for header in encodings.values() if isinstance(header, dict)}
        return codecs.pop() if len(codecs) == 1 else "float32"

    def transform(self, message: TensorMessage, fl_ctx: FLContext) -> TensorMessage | None:
        """Return the changed message, or None to pass the original on unchanged."""
        raise NotImplementedError
