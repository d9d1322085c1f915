"""The leakage recorder (``protocol.recorder``) refuses a hostile header before it decodes anything."""

import math
import tracemalloc

import pytest
from helpers import party_context
from hostile import MB, TRAIN, topk_message
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext

from split_unet.errors import ProtocolError
from split_unet.protocol.recorder import LeakageRecorder
from split_unet.protocol.rounds import activation_shapes

pytestmark = pytest.mark.unit


def test_the_leakage_recorder_applies_the_controller_bound_before_decoding(tmp_path):
    bound = max(math.prod(s) for s in activation_shapes(TRAIN, TRAIN.batch_size).values())
    recorder = LeakageRecorder(max_elements=bound, steps=[1])
    shareable = topk_message([1, 4, 512, 512, 256])  # 2^28 elements: 1 GiB once decoded
    fl_ctx, peer = party_context(tmp_path / "server", "server"), FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, "flair", private=False, sticky=False)
    fl_ctx.set_prop(FLContextKey.PEER_CONTEXT, peer, private=True, sticky=False)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=r"site 'flair', field .*more than the limit of %d" % bound):
            recorder.process(shareable, fl_ctx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * MB, peak
    assert not (tmp_path / "server").exists()  # nothing recorded

