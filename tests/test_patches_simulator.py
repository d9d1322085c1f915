"""Patch training and sliding-window inference through the real NVFlare simulator, on a non-cube grid.

Patch synchronisation: one federated step, in which the server draws each patient's patch and spatial
augmentation and every site cuts and augments its own modality, equals one step of the composed ``SplitUNet`` on
the same patches (as centralized training draws them). Sliding windows: the inference job's segmentations equal
MONAI's ``sliding_window_inference`` of the composed trained network."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from split_unet.data import MODALITIES as SITES
from split_unet.data import REGION_NAMES, find_cases, load_case, load_label, split_patients
from split_unet.defence import UNDEFENDED_SCOPE
from split_unet.jobs import training_settings
from split_unet.launch.inference import infer_in_simulator
from split_unet.launch.simulation import run_simulation
from split_unet.networks import build_split_unet
from split_unet.protocol.names import DECODER_FILE, ENCODER_FILE
from split_unet.training import TrainConfig, logits_to_masks, make_optimizer, segmentation_loss
from split_unet.training.augment import intensity_augment, intensity_seed
from split_unet.training.postprocess import MIN_COMPONENT_CANDIDATES
from split_unet.training.schedule import Schedule

from helpers import TINY_NETWORK, assert_federated_step_equals, background_where_empty, make_dataset

pytestmark = pytest.mark.simulator

GRID = [32, 28, 24]  # a cube phantom cropped to three different sides
# Uniform corners named: a job's default follows its scope (label sampling under "undefended").
TRAIN = {"size": GRID, "patch_size": 16, "patch_sampling": "uniform", "augment": True, "sw_batch_size": 3,
         "sw_overlap": 0.5, "network": TINY_NETWORK, "epochs": 1, "batch_size": 2, "val_fraction": 0.34, "lr": 0.01,
         "seed": 5}


@pytest.fixture(scope="module")
def patch_run(project_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    msd, sites = make_dataset(root / "data", patients=3)
    summary = run_simulation(sites, root / "ws", training_settings(TRAIN, wire_dtype="float32", scope=UNDEFENDED_SCOPE),
                             site_configs=project_root / "site_configs", progress=None)
    return root, msd, sites, summary


def _trained_network(workspace) -> torch.nn.Module:
    config = TrainConfig.from_dict(TRAIN)
    network = build_split_unet(config.network, (1,) * len(SITES), seed=0)
    sim = workspace / "simulator"
    for k, site in enumerate(SITES):
        network.encoders[k].load_state_dict(
            torch.load(sim / site / "simulate_job" / ENCODER_FILE, weights_only=True)["encoder"])
    network.decoder.load_state_dict(
        torch.load(next(sim.joinpath("server").rglob(DECODER_FILE)), weights_only=True)["model"])
    return network.eval()


def test_a_patch_step_equals_the_composed_network_on_the_same_patches(patch_run):
    """As ``test_one_step_equals_centralized_split_unet`` (the tolerance: ``assert_federated_step_equals``), on patches: any
    site cutting another patch or augmenting it otherwise would move its encoder differently."""
    root, msd, _, summary = patch_run
    assert "error" not in summary, summary.get("error")
    assert summary["steps"] == 1
    config = TrainConfig.from_dict(TRAIN)
    # On the wire: float32 activations of two 16^3 patches at each level, not of the grid.
    patch_bytes = 4 * 2 * sum(c * (16 // 2**k) ** 3 for k, c in enumerate(TINY_NETWORK["channels"]))
    for site in SITES:
        assert patch_bytes <= summary["bytes_per_step"]["per_site"][site]["to_server"] <= 1.01 * patch_bytes

    cases = {case.patient_id: case for case in find_cases(msd)}
    train_ids, _ = split_patients(sorted(cases), 0.34, 5)
    schedule = Schedule(train_ids, config, len(SITES))
    step = next(schedule.steps(0))
    loaded = [load_case(cases[pid], config.grid_shape) for pid in step.patient_ids]
    patches = schedule.patches(step)
    inputs = []
    for m in range(len(SITES)):  # each site: the server's patches, then its own intensity augmentation
        cut = patches.cut([item["image"][m:m + 1] for item in loaded], mode="bilinear")
        inputs.append(np.stack([intensity_augment(patch, intensity_seed(5, m, 1, k)) for k, patch in enumerate(cut)]))
    images = torch.from_numpy(np.concatenate(inputs, axis=1).astype(np.float32))
    labels = torch.from_numpy(patches.cut([item["label"] for item in loaded], mode="nearest"))
    assert labels.shape == (2, 3, 16, 16, 16)

    reference = build_split_unet(config.network, (1,) * len(SITES), seed=5)
    optimizer = make_optimizer(reference.parameters(), 0.01)
    segmentation_loss()(reference(images), labels).backward()
    optimizer.step()
    assert_federated_step_equals(reference, root / "ws" / "simulator", SITES)
    assert set(summary["dice"]) == {"WT", "TC", "ET", "mean"}  # validated by sliding windows over the grid


def test_split_sliding_window_inference_equals_monai_on_the_composed_network(patch_run, project_root):
    """The segmentations the inference job writes are MONAI's Gaussian sliding window of the composed network (a
    window without image answered as background, ``background_where_empty``), post-processed with the sizes the job chose on the patients it segmented (all labelled here).
    float32 on the wire and the same windows: the logits agree to rounding (the unit test bounds them by 1e-5), so
    a voxel may differ only where a logit lies within that of the threshold."""
    root, msd, sites, _ = patch_run
    cases = find_cases(msd)
    result = infer_in_simulator(root / "ws", sites, root / "infer", site_configs=project_root / "site_configs",
                                patients=[case.patient_id for case in cases], progress=None,
                                choose_postprocessing=True)
    assert "error" not in result, result.get("error")
    chosen = result["postprocessing"]
    assert chosen["chosen_on"] == [case.patient_id for case in cases]
    for region, size in zip(REGION_NAMES, chosen["min_component_voxels"]):
        scores = {int(candidate): score for candidate, score in chosen["scores"][region].items()}
        assert sorted(scores) == sorted(MIN_COMPONENT_CANDIDATES)
        assert size == min(c for c, score in scores.items() if score == max(scores.values()))
    network = _trained_network(root / "ws")
    config = TrainConfig.from_dict(TRAIN)
    for case in cases:
        images = torch.from_numpy(load_case(case, config.grid_shape)["image"][None])
        with torch.no_grad():
            logits = sliding_window_inference(images, config.patch_shape, 3, background_where_empty(network), 0.5,
                                              mode="gaussian")
        expected = logits_to_masks(logits, min_component_voxels=chosen["min_component_voxels"])[0].numpy()
        written = load_label(root / "infer" / "segmentations" / f"{case.patient_id}.nii.gz", config.grid_shape,
                             "msd")
        undecided = (logits[0].abs() < 1e-4).numpy()
        assert 0 < expected[0].sum() < expected[0].size and undecided.mean() < 0.01  # a real comparison
        assert np.all((written == expected) | undecided), case.patient_id
