"""Helpers shared by the tests: tiny phantom data sets and a small network."""

from pathlib import Path

from split_unet.data import generate_dataset, partition_dataset

TINY_SIZE = 32
TINY_NETWORK = {"channels": [4, 8, 16], "strides": [2, 2]}


def make_dataset(root: Path, patients: int, size: int = TINY_SIZE, seed: int = 0) -> tuple[Path, Path]:
    """(MSD folder, partitioned sites folder) of a phantom data set."""
    msd = generate_dataset(root / "msd", n_patients=patients, size=size, seed=seed, progress=False)
    partition_dataset(msd, root / "sites", progress=False)
    return msd, root / "sites"
