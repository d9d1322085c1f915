"""Encoders never leave their site, by construction: after a simulator run of the shipped job, neither the server's
workspace nor any reply the server received holds a byte sequence of any site's encoder weights, at any step."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_NETWORK, TINY_SIZE

from split_unet.data import MODALITIES as SITES
from split_unet.jobs import export, training_settings
from split_unet.launch.simulation import SIMULATE_JOB, simulate
from split_unet.leakage.record import SNAPSHOT_FOLDER
from split_unet.protocol.names import ENCODER_FILE
from split_unet.protocol.wire import TASKS

COMPONENTS = Path(__file__).parent / "site_components"
REPLY_BYTES = {"path": "site_components.reply_bytes.ReplyBytes", "args": {}}
# A needle of 16 float32 values (or 32 float16): trained weights do not repeat by chance at that length.
NEEDLE_BYTES = 64


def encoder_needles(state_dicts: list[dict]) -> dict[str, list[bytes]]:
    """{name: byte needles} of every weight tensor with enough elements, as float32 and as float16 (the wire's)."""
    needles: dict[str, list[bytes]] = {}
    for index, state in enumerate(state_dicts):
        for name, tensor in state.items():
            tensor = tensor.detach().float().flatten()
            if tensor.numel() * 2 >= NEEDLE_BYTES and tensor.abs().sum() > 0:
                needles.setdefault(f"{index}:{name}", []).extend(
                    [tensor.numpy().tobytes()[:NEEDLE_BYTES], tensor.half().numpy().tobytes()[:NEEDLE_BYTES]])
    return needles


def holders(files: list[Path], needles: dict[str, list[bytes]]) -> list[tuple[str, str]]:
    """(file, tensor) pairs where a file's bytes contain a needle of the tensor."""
    found = []
    for path in files:
        content = path.read_bytes()
        found += [(str(path), name) for name, options in needles.items() if any(n in content for n in options)]
    return found


def add_reply_bytes(job: Path) -> None:
    """``ReplyBytes`` last in the server's result chain of every task: it keeps every reply as received."""
    app = job / "app_server"
    shutil.copytree(COMPONENTS, app / "custom" / COMPONENTS.name, ignore=shutil.ignore_patterns("__pycache__"))
    config_path = app / "config" / "config_fed_server.json"
    config = json.loads(config_path.read_text())
    entries = config.setdefault("task_result_filters", [])
    for entry in entries:  # NVFlare takes one chain per task
        entry["filters"].append(REPLY_BYTES)
    covered = {task for entry in entries for task in entry["tasks"]}
    entries.append({"tasks": [task for task in TASKS if task not in covered], "filters": [REPLY_BYTES]})
    config_path.write_text(json.dumps(config, indent=2))


def site_encoders(workspace: Path) -> list[dict]:
    """Every encoder state the sites held: a snapshot of every training step and the trained encoder."""
    states = []
    for site in SITES:
        run = workspace / "simulator" / site / SIMULATE_JOB
        paths = sorted((run / SNAPSHOT_FOLDER).glob("*.pt")) + [run / ENCODER_FILE]
        states += [torch.load(path, weights_only=True)["encoder"] for path in paths]
    return states


def test_the_needle_search_finds_an_encoder_wherever_its_bytes_are(tmp_path):
    """The check below can fail: an encoder saved by torch, or its weights sent as float16, are found."""
    state = {"conv.weight": torch.randn(8, 4, 3, 3, 3), "norm.bias": torch.zeros(8)}
    needles = encoder_needles([state])
    assert set(needles) == {"0:conv.weight"}  # an all-zero tensor says nothing of a site
    torch.save({"model": state}, tmp_path / "leaked.pt")
    (tmp_path / "wire.bin").write_bytes(b"header" + state["conv.weight"].half().numpy().tobytes())
    (tmp_path / "clean.bin").write_bytes(torch.randn(8, 4, 3, 3, 3).numpy().tobytes())
    found = holders([tmp_path / "leaked.pt", tmp_path / "wire.bin", tmp_path / "clean.bin"], needles)
    assert sorted(Path(path).name for path, _ in found) == ["leaked.pt", "wire.bin"]


@pytest.mark.simulator
def test_no_encoder_weights_in_the_server_workspace_or_any_reply(project_root, tiny_data, tmp_path):
    _, sites = tiny_data
    # The shipped job (its default scope's defence) with a snapshot of every step's encoder at every site.
    train = {"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1, "val_fraction": 0.25}
    steps = 3  # 6 training patients, batch 2
    job = export(training_settings(train, record_steps=list(range(1, steps + 1)),
                                   executor_args={"num_threads": 1}), tmp_path / "job")
    add_reply_bytes(job)
    workspace = tmp_path / "ws"
    simulate(job, workspace, sites, project_root / "site_configs", progress=None)
    server = workspace / "simulator" / "server"
    summary = json.loads((server / SIMULATE_JOB / "summary.json").read_text())
    assert "error" not in summary, summary.get("error")
    assert summary["steps"] == steps

    states = site_encoders(workspace)
    assert len(states) == len(SITES) * (steps + 1)
    needles = encoder_needles(states)
    replies = sorted((server / SIMULATE_JOB / "reply_bytes").glob("*.bin"))
    # Every task's replies were kept: init, every training step, validation and finish, from every site.
    assert {path.stem.split("_", 1)[1] for path in replies} >= set(TASKS) - {"split_unet_infer"}
    files = [path for path in server.rglob("*") if path.is_file()]
    assert holders(files, needles) == []
    # The check is not blind: a site's own run folder holds its encoder.
    site_files = [p for p in (workspace / "simulator" / SITES[0]).rglob("*") if p.is_file()]
    assert holders(site_files, needles)
