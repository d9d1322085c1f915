"""The server's checkpoint: saved atomically, restored exactly, refused when it belongs to another run. Plain
code (``ServerCheckpoint``), tested without a controller or NVFlare."""

import pytest
import torch
from helpers import TINY_NETWORK, TINY_SIZE

from split_unet.errors import ProtocolError
from split_unet.networks import build_decoder
from split_unet.protocol.checkpoint import SERVER_CHECKPOINT, ServerCheckpoint
from split_unet.training import DecoderParty, TrainConfig

SITES = ["flair", "t1w", "t1gd", "t2w"]
TRAIN = {"size": TINY_SIZE, "network": TINY_NETWORK}


def _checkpoint(tmp_path, sites=SITES, **train) -> tuple[ServerCheckpoint, DecoderParty]:
    config = TrainConfig.from_dict({**TRAIN, **train})
    party = DecoderParty(build_decoder(config.network, len(sites), seed=len(train)), 1e-3, torch.device("cpu"))
    return ServerCheckpoint(tmp_path / "checkpoints" / SERVER_CHECKPOINT, sites, config), party


def test_server_checkpoint_round_trip_and_refusal(tmp_path):
    writer, written = _checkpoint(tmp_path)
    assert writer.load(written) is None  # nothing saved yet: a fresh start
    torch.manual_seed(7)
    writer.save(written, 3, 1, [0.5], [{"epoch": 1}])
    expected_draw = torch.rand(1)
    assert (tmp_path / "checkpoints" / SERVER_CHECKPOINT).is_file()

    reader, restored = _checkpoint(tmp_path, epochs=20)  # more epochs: allowed; another initial decoder
    state = reader.load(restored)
    assert (state["train_step"], state["epoch"], state["losses"], state["history"]) == (3, 1, [0.5], [{"epoch": 1}])
    for a, b in zip(restored.decoder.parameters(), written.decoder.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(1), expected_draw)  # torch's RNG continues where the saved run was

    for changed, checkpoint in (("lr", _checkpoint(tmp_path, lr=0.1)), ("sites", _checkpoint(tmp_path, SITES[:3]))):
        other, party = checkpoint
        before = [p.clone() for p in party.decoder.parameters()]
        with pytest.raises(ProtocolError, match=rf"differs in \['{changed}'\]"):
            other.load(party)
        assert all(torch.equal(a, b) for a, b in zip(before, party.decoder.parameters()))  # nothing restored
