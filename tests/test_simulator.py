"""Integration tests through the real NVFlare simulator (subprocess), on tiny phantoms."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from split_unet.data import MODALITIES as SITES
from split_unet.data import find_cases, load_case, split_patients
from split_unet.leakage.record import load_record, snapshot_path
from split_unet.networks import NetworkConfig, build_split_unet
from split_unet.defence import UNDEFENDED_SCOPE
from split_unet.jobs import training_settings
from split_unet.launch.simulation import run_simulation
from split_unet.protocol.names import DECODER_FILE, ENCODER_FILE
from split_unet.training import dropped_input, epoch_batches, make_optimizer, segmentation_loss

from helpers import TINY_NETWORK, TINY_SIZE, assert_federated_step_equals, make_dataset



def test_training_runs_and_loss_falls(trained_tiny):
    workspace, summary = trained_tiny
    assert "error" not in summary, summary.get("error")
    assert (workspace / "summary.json").is_file()
    losses = [entry["loss"] for entry in summary["history"]]
    assert losses[-1] < losses[0]
    assert set(summary["dice"]) == {"WT", "TC", "ET", "mean"}
    assert summary["steps"] == 3 * 3  # 6 training patients, batch 2
    # One round trip per step; float16 tensors of the three levels, per site and direction, nothing more.
    assert summary["timing"]["round_trips_per_step"] == 1
    assert len(summary["timing"]["step_seconds"]) == summary["steps"]
    float16_bytes = 2 * sum(c * (TINY_SIZE // 2 ** k) ** 3 for k, c in enumerate(TINY_NETWORK["channels"])) * 2
    for site in SITES:
        sent = summary["bytes_per_step"]["per_site"][site]
        assert float16_bytes <= sent["to_server"] <= 1.01 * float16_bytes
        assert float16_bytes <= sent["to_site"] <= 1.01 * float16_bytes
        assert summary["memory_mb"]["sites"][site] > 100
    assert summary["memory_mb"]["server"] > 100
    artefacts = summary["artefacts"]
    for site in SITES:
        assert (workspace / "simulator" / site / "simulate_job" / ENCODER_FILE).is_file()
    assert list((workspace / "simulator" / "server" / "simulate_job" / "tb_events").rglob("events.out.*"))
    assert artefacts["decoder"].endswith(DECODER_FILE)

    # The leakage record: what the server received and sent at steps 1 and 9, and the sites' snapshots.
    record = load_record(artefacts["leakage_record"])
    assert sorted((e.step, e.site) for e in record) == sorted((s, site) for s in (1, 9) for site in SITES)
    for exchange in record:
        assert len(exchange.patient_ids) == 2 and sorted(exchange.activations) == [0, 1, 2]
        assert sorted(exchange.gradients) == [0, 1, 2]
        assert exchange.gradients[0].shape == exchange.activations[0].shape == (2, 4, TINY_SIZE, TINY_SIZE, TINY_SIZE)
        assert snapshot_path(workspace / "simulator" / exchange.site / "simulate_job", exchange.step).is_file()


@pytest.mark.simulator
def test_one_step_equals_centralized_split_unet(project_root, tmp_path):
    """float32 on the wire, no filters: one federated step == one SplitUNet step (max abs diff <= 1e-5 on every
    weight whose gradient is not tiny; the tolerance argument is ``assert_federated_step_equals``'s)."""
    msd, sites = make_dataset(tmp_path / "data", patients=3)
    train = {"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1, "batch_size": 2, "val_fraction": 0.34,
             "lr": 0.01, "seed": 5}
    summary = run_simulation(sites, tmp_path / "ws",
                             training_settings(train, wire_dtype="float32", scope=UNDEFENDED_SCOPE),
                             site_configs=project_root / "site_configs", progress=None)
    assert "error" not in summary, summary.get("error")
    assert summary["steps"] == 1

    config = NetworkConfig.from_dict({**NetworkConfig().to_dict(), **TINY_NETWORK})
    cases = {case.patient_id: case for case in find_cases(msd)}
    train_ids, _ = split_patients(sorted(cases), 0.34, 5)
    (batch,) = epoch_batches(train_ids, 2, 5, 0)
    loaded = [load_case(cases[pid], TINY_SIZE) for pid in batch]
    images = torch.from_numpy(np.stack([item["image"] for item in loaded]))
    labels = torch.from_numpy(np.stack([item["label"] for item in loaded]))
    reference = build_split_unet(config, (1, 1, 1, 1), seed=5)
    optimizer = make_optimizer(reference.parameters(), 0.01)
    loss = segmentation_loss()(reference(images), labels)
    loss.backward()
    optimizer.step()

    assert_federated_step_equals(reference, tmp_path / "ws" / "simulator", SITES)


def _final_weights(workspace):
    sim = workspace / "simulator"
    weights = {site: torch.load(sim / site / "simulate_job" / ENCODER_FILE, weights_only=True)["encoder"]
               for site in SITES}
    weights["decoder"] = torch.load(next(sim.joinpath("server").rglob(DECODER_FILE)),
                                    weights_only=True)["model"]
    return weights


@pytest.mark.simulator
def test_modality_dropout_and_resume_equal_an_uninterrupted_run(project_root, tmp_path):
    """Modality dropout (seed 0, rate 0.5) leaves t1w out of step 2: it sends nothing then. 4 steps in one run
    == 2 steps, a checkpoint, and a second job that resumes and runs 2 more."""
    _, sites = make_dataset(tmp_path / "data", patients=3)
    train = {"size": TINY_SIZE, "network": TINY_NETWORK, "batch_size": 1, "val_fraction": 0.34, "epochs": 2,
             "modality_dropout": 0.5, "seed": 0}
    run = dict(site_configs=project_root / "site_configs", progress=None)
    # Each party's checkpoints lie in its own workspace, whose "persistent" folder outlives the simulator run.
    checkpoints = {"executor_args": {"checkpoint_dir": "persistent/checkpoints"},
                   "controller_args": {"checkpoint_dir": "persistent/checkpoints", "checkpoint_interval": 2}}
    whole = run_simulation(sites, tmp_path / "whole", training_settings(train, record_steps=[1, 2, 3, 4],
                                                                           scope=UNDEFENDED_SCOPE), **run)
    first = run_simulation(sites, tmp_path / "first", training_settings({**train, "epochs": 1}, scope=UNDEFENDED_SCOPE,
                                                                          **checkpoints),
                           persistent=tmp_path / "state", **run)
    checkpoints["controller_args"]["resume"] = True
    second = run_simulation(sites, tmp_path / "second", training_settings(train, scope=UNDEFENDED_SCOPE, **checkpoints),
                            persistent=tmp_path / "state", **run)
    for summary in (whole, first, second):
        assert "error" not in summary, summary.get("error")
    absent = {step: dropped_input(0.5, len(SITES), 0, step) for step in (1, 2, 3, 4)}
    assert absent == {1: None, 2: 1, 3: None, 4: None}
    record = load_record(whole["artefacts"]["leakage_record"])
    for step, k in absent.items():
        assert {e.site for e in record if e.step == step} == set(SITES) - ({SITES[k]} if k is not None else set())
    assert all(sorted(e.gradients) == [0, 1, 2] for e in record)

    log = (tmp_path / "second" / "simulator.log").read_text()
    assert "resuming after training step 2" in log and log.count("resumed from") == len(SITES)
    assert [e["loss"] for e in second["history"]] == pytest.approx([e["loss"] for e in whole["history"]], abs=1e-6)
    expected, resumed = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "second")
    for part, state in expected.items():
        for name, value in state.items():
            assert (torch.as_tensor(resumed[part][name]) - torch.as_tensor(value)).abs().max() <= 1e-6, (part, name)
    assert sorted(p.name for p in (tmp_path / "state" / "flair" / "checkpoints").iterdir()) == ["step_0000002.pt",
                                                                                                "step_0000004.pt"]


@pytest.mark.simulator
def test_corrupt_file_at_a_site_stops_the_job_naming_site_patient_file(project_root, tiny_data, tmp_path):
    _, sites = tiny_data
    broken = tmp_path / "sites"
    shutil.copytree(sites, broken)
    victim = broken / "t1gd" / "images" / "BRATS_003.nii.gz"
    victim.write_bytes(victim.read_bytes()[:200])
    summary = run_simulation(broken, tmp_path / "ws", training_settings({"size": TINY_SIZE, "network": TINY_NETWORK,
                                                                       "epochs": 1}, scope=UNDEFENDED_SCOPE),
                             site_configs=project_root / "site_configs", progress=None)
    error = summary["error"]
    assert "t1gd" in error and "BRATS_003" in error and "BRATS_003.nii.gz" in error


@pytest.mark.simulator
def test_a_volume_of_another_shape_at_one_site_stops_the_job_naming_it_and_the_reference(project_root, tiny_data,
                                                                                          tmp_path):
    """Each site sees only its own modality: the server compares every patient's grid across the parties at start."""
    _, sites = tiny_data
    odd = tmp_path / "sites"
    shutil.copytree(sites, odd)
    victim = odd / "t2w" / "images" / "BRATS_003.nii.gz"
    image = nib.load(victim)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., :-2], image.affine, image.header), victim)
    summary = run_simulation(odd, tmp_path / "ws", training_settings({"size": TINY_SIZE, "network": TINY_NETWORK,
                                                                     "epochs": 1}, scope=UNDEFENDED_SCOPE),
                             site_configs=project_root / "site_configs", progress=None)
    error = summary["error"]
    assert "site 't2w', patient 'BRATS_003'" in error and "images/BRATS_003.nii.gz" in error, error
    assert f"shape ({TINY_SIZE}, {TINY_SIZE}, {TINY_SIZE - 2}) differs from ({TINY_SIZE}, {TINY_SIZE}, {TINY_SIZE}) "\
           "of site 'flair'" in error, error


@pytest.mark.simulator
def test_tensorboard_logs_against_the_training_step(trained_tiny):
    """Loss per training step 1..N and validation at step N, as centralized training logs them (not against
    NVFlare task rounds, which include the init, validation and finish rounds)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, summary = trained_tiny
    (events_file,) = Path(summary["artefacts"]["tensorboard"]).rglob("events.out.*")
    events = EventAccumulator(str(events_file.parent))
    events.Reload()
    steps = summary["steps"]
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, steps + 1))
    assert [event.step for event in events.Scalars("val/dice_mean")] == [steps]
