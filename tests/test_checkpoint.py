"""The server's checkpoint: saved atomically, restored exactly, refused when it belongs to another run."""

import pytest
import torch
from helpers import TINY_NETWORK, TINY_SIZE, StandInEngine
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext

from split_unet.errors import ProtocolError
from split_unet.networks import NetworkConfig, build_decoder
from split_unet.protocol.checkpoint import SERVER_CHECKPOINT
from split_unet.protocol.controller import SplitUNetController
from split_unet.training import DecoderParty

TRAIN = {"size": TINY_SIZE, "network": TINY_NETWORK}


def _controller(tmp_path, **train):
    controller = SplitUNetController(train={**TRAIN, **train}, checkpoint_dir="checkpoints", checkpoint_interval=1,
                                     resume=True, persistor_id="")
    network = NetworkConfig.from_dict({**NetworkConfig().to_dict(), **TINY_NETWORK})
    controller.party = DecoderParty(build_decoder(network, 4, seed=len(train)), 1e-3, torch.device("cpu"))
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, StandInEngine(tmp_path), private=True, sticky=False)
    return controller, fl_ctx


def test_server_checkpoint_round_trip_and_refusal(tmp_path):
    writer, fl_ctx = _controller(tmp_path)
    assert writer._load_checkpoint(fl_ctx) is None  # nothing saved yet: a fresh start
    writer._round = lambda *args, **kwargs: []  # the sites' part of the checkpoint is tested in the simulator
    writer._save_checkpoint(3, 1, [0.5], [{"epoch": 1}], None, fl_ctx)
    assert (tmp_path / "checkpoints" / SERVER_CHECKPOINT).is_file()

    reader, fl_ctx = _controller(tmp_path, epochs=20)  # more epochs: allowed; another initial decoder
    state = reader._load_checkpoint(fl_ctx)
    assert (state["train_step"], state["epoch"], state["losses"]) == (3, 1, [0.5])
    for a, b in zip(reader.party.decoder.parameters(), writer.party.decoder.parameters()):
        assert torch.equal(a, b)

    other, fl_ctx = _controller(tmp_path, lr=0.1)
    with pytest.raises(ProtocolError, match=r"differs in \['lr'\]"):
        other._load_checkpoint(fl_ctx)
