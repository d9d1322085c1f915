"""Centralized baselines and the split-unet command on tiny phantoms."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import TINY_NETWORK, TINY_SIZE

from split_unet.cli import build_parser, main
from split_unet.launch.options import NOT_OPTIONS, train_overrides
from split_unet.training import TrainConfig
from split_unet.training.centralized import CaseCache, mode_inputs, train_centralized
from split_unet.training.patches import cut_patch, sample_patch_starts


@pytest.mark.parametrize("mode,modality,channels", [("late", None, (1, 1, 1, 1)), ("early", None, (4,)),
                                                     ("single", "t1gd", (1,))])
def test_modes_choose_inputs(mode, modality, channels):
    in_channels, image_channels = mode_inputs(mode, modality)
    assert in_channels == channels and len(image_channels) == sum(channels)


def test_single_mode_needs_a_modality():
    with pytest.raises(ValueError, match="--modality"):
        mode_inputs("single", None)


def test_centralized_training_writes_a_summary(tiny_data, tmp_path):
    msd, _ = tiny_data
    config = TrainConfig(epochs=2, size=TINY_SIZE, network=TINY_NETWORK, val_interval=1)
    summary = train_centralized(msd, tmp_path, mode="early", config=config, log=lambda _: None)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["dice"] == summary["dice"] and set(saved["hd95"]) == {"WT", "TC", "ET"}
    assert saved["steps"] == 6 and saved["config"]["mode"] == "early"
    assert saved["history"][1]["loss"] < saved["history"][0]["loss"]
    assert list((tmp_path / "tb_events").glob("events.out.*"))


def test_cli_synth_partition_and_table(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "msd"), "--patients", "2", "--size", "16"]) == 0
    assert main(["partition", "--data", str(tmp_path / "msd"), "--out", str(tmp_path / "sites")]) == 0
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == ["flair", "server", "t1gd", "t1w", "t2w"]
    summary = {"dice": {"WT": 0.9, "TC": 0.8, "ET": 0.7, "mean": 0.8}, "hd95": {"WT": 1, "TC": 2, "ET": 3},
               "wall_seconds": 60}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    assert main(["table", f"split={tmp_path / 'run'}"]) == 0
    assert "| split | 0.900 | 0.800 | 0.700 | 0.800 |" in capsys.readouterr().out


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["partition", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "sites")]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_leakage_table(tmp_path, capsys):
    document = {"attacks": {
        "whitebox": {"flair": {"1": {"ssim": 0.99}, "192": {"ssim": 0.95}}},
        "learned": {"flair": {"1": {"ssim": 0.61, "excess_ssim": 0.27}}},
        "labels": {"flair": {"1": {"dice_wt": 0.6, "random_dice_wt": 0.05}}},
    }}
    (tmp_path / "leakage.json").write_text(json.dumps(document))
    assert main(["table", "--leakage", f"all levels={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "| all levels | whitebox | ssim | 0.99 -> 0.95 |" in out
    assert "| all levels | labels | dice_wt | 0.60 (0.05) |" in out
    assert "| all levels | learned | ssim | 0.61 (+0.27) |" in out  # the excess over the population prior


@pytest.mark.parametrize("command", [["simulate", "--sites", "s", "--workspace", "w"], ["centralized", "--data", "d",
                                     "--out", "o"], ["infer", "--sites", "s", "--workspace", "w"],
                                     ["bench", "--out", "o"], ["check", "--sites", "s"]])
def test_spacing_wherever_size_is_accepted(command):
    args = build_parser().parse_args([*command, "--size", "128", "--spacing", "1.875"])
    assert (args.size, args.spacing) == (128, 1.875)
    if command[0] in ("simulate", "centralized"):
        assert train_overrides(args)["spacing"] == 1.875


@pytest.mark.parametrize("command", [["simulate", "--sites", "s", "--workspace", "w"],
                                     ["poc", "--sites", "s", "--workspace", "w"], ["job", "export", "--out", "o"]])
def test_the_transport_is_a_job_setting_of_every_command_that_builds_a_training_job(command):
    from split_unet.cli import TRANSPORTS, training_job
    from split_unet.protocol.transport import TRANSPORTS as PROTOCOL_TRANSPORTS

    assert TRANSPORTS == PROTOCOL_TRANSPORTS
    assert training_job(build_parser().parse_args([*command, "--transport", "push"])).transport == "push"
    assert training_job(build_parser().parse_args(command)).transport == "poll"  # the job's default


def test_centralized_patch_training_with_augmentation_and_sliding_window_validation(tiny_data, tmp_path):
    msd, _ = tiny_data
    config = TrainConfig(epochs=1, batch_size=3, size=TINY_SIZE, patch_size=16, patch_sampling="label",
                         augment=True, sw_batch_size=3, network=TINY_NETWORK)
    summary = train_centralized(msd, tmp_path, mode="late", config=config, log=lambda _: None)
    assert summary["steps"] == 2  # 6 training patients in batches of 3
    assert set(summary["dice"]) == {"WT", "TC", "ET", "mean"} and set(summary["hd95"]) == {"WT", "TC", "ET"}
    assert all(0.0 <= value <= 1.0 for value in summary["dice"].values())
    assert summary["config"]["patch_size"] == 16


def test_patch_batch_cuts_the_corners_the_server_draws(tiny_data):
    msd, _ = tiny_data
    data = CaseCache(msd, TINY_SIZE, None)
    patients = sorted(data.cases)[:2]
    config = TrainConfig(size=TINY_SIZE, patch_size=(16, 8, 32), seed=5)
    images, labels = data.patch_batch(patients, [2, 0], config, train_step=4)
    corners = sample_patch_starts(config.grid_shape, (16, 8, 32), 5, 4, 2)
    for k, patient in enumerate(patients):
        case = data.get(patient)
        np.testing.assert_array_equal(images[k].numpy(), cut_patch(case["image"], corners[k], (16, 8, 32))[[2, 0]])
        np.testing.assert_array_equal(labels[k].numpy(), cut_patch(case["label"], corners[k], (16, 8, 32)))


def test_centralized_cache_keeps_at_most_cache_cases(tiny_data):
    msd, _ = tiny_data
    data = CaseCache(msd, TINY_SIZE, None, cache_cases=2)
    first, second, third = sorted(data.cases)[:3]
    kept, dropped = data.get(first), data.get(second)
    assert data.get(first) is kept  # still cached, and now the most recently used
    data.get(third)  # evicts the least recently used: second
    assert data.get.cache_info().currsize == 2 and data.get(first) is kept
    assert data.get(second) is not dropped  # loaded again


# The training options of the command line before they were made from TrainConfig's fields, each with a value: the
# README's and the docs' commands use them.
EARLIER_OPTIONS = {"--epochs": "3", "--steps-per-epoch": "5", "--batch-size": "4", "--lr": "0.01",
                   "--lr-schedule": "poly", "--seed": "7", "--size": "96,96,64", "--spacing": "1.5",
                   "--val-interval": "2", "--val-fraction": "0.2", "--device": "cpu", "--channels": "4,8,16,32",
                   "--levels": "0,2,3", "--fusion": "mean", "--full-res-channels": "1", "--full-res-bits": "2",
                   "--modality-dropout": "0.25", "--micro-batches": "2", "--decoder-checkpointing": None,
                   "--min-component-voxels": "10", "--patch-size": "32", "--patch-sampling": "label",
                   "--patch-positive-fraction": "0.3", "--augment": None, "--sw-batch-size": "3",
                   "--sw-overlap": "0.25", "--no-amp": None, "--cache-cases": "8"}


def test_every_training_field_is_an_option_with_its_docstring_as_help_and_the_earlier_options_remain():
    parser = build_parser()
    simulate = parser._subparsers._group_actions[0].choices["simulate"]
    options = {action.dest: action for action in simulate._actions}
    for field in dataclasses.fields(TrainConfig):
        assert (field.name in options) == (field.name not in NOT_OPTIONS), field.name
        assert field.name in NOT_OPTIONS or options[field.name].help, field.name
    assert options["steps_per_epoch"].help == ("An epoch of this many steps (default: one pass over the training "
                                               "patients).")
    assert options["lr_schedule"].choices == ("constant", "poly") and options["amp"].default is None
    given = [part for option, value in EARLIER_OPTIONS.items() for part in (option, value) if part is not None]
    args = parser.parse_args(["simulate", "--sites", "s", "--workspace", "w", *given])
    config = TrainConfig.from_dict(train_overrides(args))
    assert (config.epochs, config.steps_per_epoch, config.lr_schedule, config.size, config.patch_size) == \
        (3, 5, "poly", (96, 96, 64), 32)
    assert config.network.channels == (4, 8, 16, 32) and config.network.fusion == "mean" and not config.amp
    assert config.decoder_checkpointing and config.augment and config.cache_cases == 8


def test_the_options_read_from_the_source_are_trainconfigs_fields_and_building_them_imports_no_torch():
    from split_unet.launch.options import train_fields
    from split_unet.training.config import LR_SCHEDULES, PATCH_SAMPLING

    read = train_fields()
    assert list(read) == [field.name for field in dataclasses.fields(TrainConfig)]
    assert (read["lr_schedule"].choices, read["patch_sampling"].choices) == (LR_SCHEDULES, PATCH_SAMPLING)
    assert read["patch_size"].kinds == ("int", "tuple", "None") and read["amp"].kinds == ("bool",)
    script = "import sys; from split_unet.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_centralized_command_takes_patch_options():
    args = build_parser().parse_args(["centralized", "--data", "d", "--out", "o", "--patch-size", "96,96,64",
                                      "--patch-sampling", "label", "--augment", "--sw-overlap", "0.25", "--no-amp"])
    config = TrainConfig.from_dict(train_overrides(args))
    assert config.patch_shape == (96, 96, 64) and config.patch_sampling == "label" and config.augment
    assert config.sw_overlap == 0.25 and not config.amp and config.sw_batch_size == TrainConfig().sw_batch_size
    plain = build_parser().parse_args(["centralized", "--data", "d", "--out", "o"])
    assert TrainConfig.from_dict(train_overrides(plain)) == TrainConfig()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["centralized", "--data", "d", "--out", "o", "--patch-size", "96,96"])


# Run in a fresh interpreter in which the extra's module cannot be imported, as after `pip install -e .` alone.
WITHOUT_MODULE = """
import sys
sys.modules[sys.argv[1]] = None  # import of it raises ModuleNotFoundError, as if not installed
from split_unet.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("module, extra, command", [
    ("nilearn", "phantom", ["synth", "--out", "{tmp}/phantom", "--patients", "1", "--size", "16"]),
    ("skimage", "studies", ["leakage", "--workspace", "{tmp}/ws", "--sites", "{tmp}/sites"]),
    ("matplotlib", "studies", ["report", "--sweep", "{tmp}/sweep.json", "--out", "{tmp}/report"]),
])
def test_a_command_behind_a_missing_extra_names_the_extra_in_one_line(tmp_path, module, extra, command):
    arguments = [part.format(tmp=tmp_path) for part in command]
    done = subprocess.run([sys.executable, "-c", WITHOUT_MODULE, module, *arguments], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SPLIT_UNET_CACHE": ""})  # the phantom's anatomy uncached
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (f"split-unet {command[0]} needs the {extra} extra: "
                                   f"pip install 'split-unet[{extra}]'")
