"""Training options shared by the command-line launchers (``split-unet simulate``, ``centralized``, ``poc``, ...)."""

from __future__ import annotations

import argparse


def train_overrides(args: argparse.Namespace) -> dict:
    """Only the options the user gave; the job config (or TrainConfig) supplies the rest."""
    train = {key: getattr(args, key) for key in ("epochs", "steps_per_epoch", "lr_schedule", "batch_size", "lr",
                                                 "seed", "size", "spacing",
                                                 "val_interval", "val_fraction", "device", "modality_dropout",
                                                 "micro_batches", "decoder_checkpointing", "min_component_voxels",
                                                 "patch_size", "patch_sampling", "patch_positive_fraction", "augment",
                                                 "sw_batch_size", "sw_overlap", "amp", "cache_cases")
             if getattr(args, key, None) is not None}
    network = {}
    if getattr(args, "channels", None):
        network["channels"] = [int(c) for c in args.channels.split(",")]
        network["strides"] = [2] * (len(network["channels"]) - 1)
    if getattr(args, "levels", None):
        network["levels"] = [int(level) for level in args.levels.split(",")]
    if getattr(args, "fusion", None):
        network["fusion"] = args.fusion
    for key in ("full_res_channels", "full_res_bits"):
        if getattr(args, key, None) is not None:
            network[key] = getattr(args, key)
    if network:
        train["network"] = network
    return train


def add_train_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training budget (defaults: the job config / TrainConfig)")
    group.add_argument("--epochs", type=int)
    group.add_argument("--steps-per-epoch", type=int,
                       help="an epoch of this many steps (default: one pass over the training patients)")
    group.add_argument("--batch-size", type=int)
    group.add_argument("--lr", type=float)
    group.add_argument("--lr-schedule", choices=("constant", "poly"),
                       help="poly: nnU-Net's decay over epochs x steps-per-epoch steps (needs --steps-per-epoch)")
    group.add_argument("--seed", type=int)
    add_grid_options(group)
    group.add_argument("--val-interval", type=int)
    group.add_argument("--val-fraction", type=float)
    group.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    group.add_argument("--channels", help="feature channels per level, e.g. 8,16,32,64")
    group.add_argument("--levels", help="levels the sites send, e.g. 1,2,3 (default: all)")
    group.add_argument("--fusion", choices=("concat", "mean"))
    group.add_argument("--full-res-channels", type=int,
                       help="send the full-resolution level narrowed to this many learned channels (default: all)")
    group.add_argument("--full-res-bits", type=int,
                       help="quantise the narrowed full-resolution level to 2**bits values per channel")
    group.add_argument("--modality-dropout", type=float,
                       help="probability that one site, drawn per step, is left out of a training step (default 0)")
    group.add_argument("--micro-batches", type=int,
                       help="the server's decoder runs each batch in this many parts (less memory, same step)")
    group.add_argument("--decoder-checkpointing", action="store_true", default=None,
                       help="the decoder recomputes activations in its backward pass (less server memory)")
    group.add_argument("--min-component-voxels", type=int,
                       help="post-processing: remove connected components smaller than this (grid voxels) from "
                            "every segmentation (default 0: none)")
    add_patch_options(parser)


def add_grid_options(parser, size_default: int | None = None) -> None:
    """``--size`` and ``--spacing``: the common voxel grid (README, "Your own data", on how to choose them)."""
    parser.add_argument("--size", type=shape_option, default=size_default,
                        help="the common grid after crop/pad: N (a cube) or X,Y,Z voxels, e.g. 240,240,155")
    parser.add_argument("--spacing", type=float, help="isotropic spacing (mm) to resample to before the crop/pad "
                                                      "(default: none, the source voxels; 1 mm for BraTS)")


def shape_option(text: str) -> int | list[int]:
    """``N`` (a cube side) or ``X,Y,Z`` (three sides), as ``TrainConfig`` takes them."""
    sides = [int(side) for side in text.split(",")]
    if len(sides) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected N or X,Y,Z, got {text!r}")
    return sides[0] if len(sides) == 1 else sides


def add_patch_options(parser: argparse.ArgumentParser) -> None:
    """Patch training, augmentation, sliding-window validation and mixed precision (defaults: TrainConfig)."""
    group = parser.add_argument_group("patches, augmentation and sliding window (default: whole volumes)")
    group.add_argument("--patch-size", type=shape_option, help="train on patches of N^3 or X,Y,Z voxels; validate "
                                                               "with a sliding window of that size")
    group.add_argument("--patch-sampling", choices=("uniform", "label"),
                       help="uniform (the corners tell the sites nothing) or label (a share of the patches centred "
                            "on tumour: the sites learn where it is). Default: label where the scope allows it "
                            "('undefended'), else uniform")
    group.add_argument("--patch-positive-fraction", type=float, help="label sampling: share centred on tumour")
    group.add_argument("--augment", action="store_true", default=None,
                       help="spatial (flips, 90-degree rotations, small affine) and intensity augmentation")
    group.add_argument("--sw-batch-size", type=int, help="sliding-window windows per batch (round trip)")
    group.add_argument("--sw-overlap", type=float, help="sliding-window overlap in [0, 1)")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="mixed precision on CUDA (default on; no effect on the CPU)")
    group.add_argument("--cache-cases", type=int,
                       help="preprocessed volumes each party keeps in memory, least recently used out first "
                            "(default 64; 0: all)")
