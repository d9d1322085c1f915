"""A filter for the tests that changes nothing and keeps the bytes of every payload it sees: each numpy array of the
DXO's data and meta as it arrived, and, for a tensor message, each decoded tensor as float32 and as float16, one file
per payload in the party's run folder (``reply_bytes/``). Placed last in the server's result chains, it holds every
reply the server received, as the server received it."""

import itertools
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from split_unet.protocol.wire import TensorMessage

FOLDER = "reply_bytes"
_count = itertools.count()


def _arrays(value):
    """Every numpy array inside nested dicts and lists."""
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arrays(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _arrays(item)


class ReplyBytes(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        chunks = [array.tobytes() for array in _arrays(dict(shareable))]
        try:
            dxo = from_shareable(shareable)
        except Exception:  # not a DXO: its arrays (if any) are kept above
            dxo = None
        if dxo is not None:
            chunks += [array.tobytes() for array in _arrays({"data": dxo.data, "meta": dxo.meta})]
            try:
                message = TensorMessage.from_shareable(shareable, dxo.data_kind, site=None)
            except Exception:  # not a tensor message
                message = None
            if message is not None:
                for tensor in message.tensors.values():
                    chunks += [tensor.float().numpy().tobytes(), tensor.half().numpy().tobytes()]
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        folder = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())) / FOLDER
        folder.mkdir(exist_ok=True)
        (folder / f"{next(_count):06d}_{task}.bin").write_bytes(b"".join(chunks))
        return shareable
