"""Model and checkpoint files a job names (``protocol.checkpoint.load_checkpoint``): a pickle named as encoder,
site checkpoint or decoder runs no code, and the refusal names the party and the field."""

import re
from pathlib import Path

import pytest
import torch
from helpers import error_of, party_context
from hostile import TRAIN, init_task, site_workspace

from split_unet.errors import ProtocolError
from split_unet.networks import build_decoder
from split_unet.protocol.executor import ModalitySiteExecutor
from split_unet.protocol.inference import SplitInferenceController

pytestmark = pytest.mark.unit


class CodeInPickle:
    """Unpickling this object calls ``open(marker, "w")``: proof that a file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _pickle_bomb(path: Path, marker: Path, key: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: CodeInPickle(marker)}, path)
    return path


def test_every_torch_load_in_the_package_is_weights_only():
    package = Path(__file__).resolve().parents[1] / "custom" / "split_unet"
    calls = [(path.name, call) for path in package.rglob("*.py")
             for call in re.findall(r"torch\.load\([^)]*\)", path.read_text())]
    assert calls and all("weights_only=True" in call for _, call in calls), calls


def test_a_pickle_as_encoder_path_runs_no_code_at_the_site(tiny_data, tmp_path):
    _, sites = tiny_data
    marker = tmp_path / "code_ran"
    _pickle_bomb(tmp_path / "ws" / "trained" / "encoder.pt", marker, "encoder")
    error = error_of(init_task(ModalitySiteExecutor(encoder_path="trained/encoder.pt"), site_workspace(tmp_path / "ws", sites)))
    assert not marker.exists()
    assert "site 'flair'" in error and "field 'encoder_path'" in error and "Weights only load failed" in error


def test_a_pickle_as_site_checkpoint_runs_no_code_on_resume(tiny_data, tmp_path):
    _, sites = tiny_data
    marker = tmp_path / "code_ran"
    _pickle_bomb(tmp_path / "ws" / "checkpoints" / "flair" / "step_0000001.pt", marker, "encoder")
    executor = ModalitySiteExecutor(checkpoint_dir="checkpoints/{site}")
    error = error_of(init_task(executor, site_workspace(tmp_path / "ws", sites), resume_step=1))
    assert not marker.exists()
    assert "site 'flair'" in error and "field 'resume_step'" in error


def test_a_pickle_as_decoder_path_runs_no_code_at_the_server(tmp_path):
    marker = tmp_path / "code_ran"
    _pickle_bomb(tmp_path / "server" / "trained" / "decoder.pt", marker, "model")
    controller = SplitInferenceController(decoder_path="trained/decoder.pt", train=TRAIN.to_dict())
    with pytest.raises(ProtocolError, match="site 'server', field 'decoder_path'.*Weights only load failed"):
        controller.load_decoder(build_decoder(TRAIN.network, 4, 0), party_context(tmp_path / "server", "server"))
    assert not marker.exists()

