"""What every Split-U-Net filter shares: NVFlare's ``DXOFilter``, on the payloads it understands only.

A site privacy policy runs its filters on every task of every job, so a filter must pass anything that
is not a Split-U-Net tensor message of its kind through untouched: NVFlare's own messages, other jobs'
payloads, plain replies and error replies. ``DXOFilter.process`` does that (no DXO, a return code other
than OK, empty data or another data kind: the payload passes as it came) and records the name of every
filter that changed a DXO in the DXO's filter history (``meta["filter_history"]``) and the job's audit log.
"""

from __future__ import annotations

from abc import abstractmethod

from nvflare.apis.dxo import DXO
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.server_engine_spec import ServerEngineSpec
from nvflare.apis.shareable import Shareable

from split_unet.protocol.wire import TensorMessage


class TensorMessageFilter(DXOFilter):
    """Filter base: ``transform`` sees decoded messages of ``kinds`` only; everything else passes as is."""

    kinds: tuple[str, ...] = ()

    keep_fraction = 0.1

    def __init__(self):
        super().__init__(supported_data_kinds=list(self.kinds), data_kinds_to_filter=None)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        message = TensorMessage.from_shareable(dxo.to_shareable(), dxo.data_kind, site=fl_ctx.get_identity_name())
        transformed = self.transform(message, fl_ctx)
        if transformed is None:
            return None
        # Re-encode with the codec and compression the message arrived in unless the filter chooses a codec;
        # NVFlare's headers (return code, task id, peer properties) stay as they were, and DXOFilter carries the
        # filter history of the incoming DXO over to this new one.
        encodings = dxo.meta.get("encodings", {})
        return transformed.to_dxo(self.output_codec(encodings), self.keep_fraction,
                                  arrived_in(encodings, "compression"))[0]

    @abstractmethod
    def transform(self, message: TensorMessage, fl_ctx: FLContext) -> TensorMessage | None:
        """Return the changed message, or None to pass the original on unchanged."""

    def output_codec(self, encodings: dict) -> str:
        """The codec the message arrived in (float32 when it had no tensors)."""
        return arrived_in(encodings, "codec") or "float32"


def arrived_in(encodings: dict, key: str) -> str | None:
    """The one value of ``key`` in every level's encoding header (None when the levels disagree or there are none)."""
    values = {header.get(key) for header in encodings.values() if isinstance(header, dict)}
    return values.pop() if len(values) == 1 else None


def receiving_site(fl_ctx: FLContext) -> str | None:
    """The site a task's data is for, as a site's ``task_data_filter`` sees it. At a site that is the site itself;
    NVFlare 2.9's simulator, however, runs the sites' privacy policy in the server process, on the way out
    (measured: a hijack alarm came from ``simulator_server`` with the task's peer ``flair``), so there it is the
    task's peer."""
    if isinstance(fl_ctx.get_engine(), ServerEngineSpec):
        peer = fl_ctx.get_peer_context()
        return peer.get_identity_name() if peer is not None else None
    return fl_ctx.get_identity_name()
