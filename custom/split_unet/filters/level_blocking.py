"""Level blocking at the site: levels its policy forbids never leave it (e.g. the full-resolution one).

On the site's answer to ``split_unet_init`` the filter declares the blocked levels, so the server refuses
a job whose network would need them before training starts, with the site and the levels named. On
every later answer it removes those levels, whatever the job asked for; a server that still expects
them then fails on a clear level mismatch instead of training on something else.
"""

from __future__ import annotations

from collections.abc import Sequence

from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_SITE_INFO, TensorMessage

from .base import TensorMessageFilter

BLOCKED_LEVELS_KEY = "blocked_levels"


class LevelBlocking(TensorMessageFilter):
    """Site-side ``task_result_filter`` on every Split-U-Net task.

    Args:
        blocked_levels: U-Net levels (0 = full resolution) this site never sends.
    """

    kinds = (KIND_ACTIVATIONS, KIND_SITE_INFO)

    def __init__(self, blocked_levels: Sequence[int] = (0,)):
        super().__init__()
        self.blocked_levels = sorted(set(int(level) for level in blocked_levels))

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.data_kind == KIND_SITE_INFO:
            dxo.data[BLOCKED_LEVELS_KEY] = sorted(set(dxo.data.get(BLOCKED_LEVELS_KEY, [])) | set(self.blocked_levels))
            return dxo
        return super().process_dxo(dxo, shareable, fl_ctx)

    def transform(self, message: TensorMessage, fl_ctx: FLContext) -> TensorMessage | None:
        if not set(message.tensors) & set(self.blocked_levels):
            return None
        message.tensors = {level: t for level, t in message.tensors.items() if level not in self.blocked_levels}
        return message
