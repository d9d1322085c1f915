"""Partly different patient sets per site (partition --overlap) and the intersection PSI must find."""

import json

import pytest

from split_unet.data import SERVER_SITE, holdings, partition_dataset

PARTIES = ["flair", "t1w", "t1gd", "t2w", SERVER_SITE]


def test_holdings_default_is_everyone_holds_everything():
    ids = [f"p{i}" for i in range(10)]
    assert holdings(ids, PARTIES) == {party: ids for party in PARTIES}


@pytest.mark.parametrize("overlap", [0.5, 0.8, 1.0])
def test_holdings_intersection_is_exactly_the_overlap(overlap):
    ids = [f"p{i:02d}" for i in range(40)]
    held = holdings(ids, PARTIES, overlap, seed=3)
    common = set.intersection(*(set(v) for v in held.values()))
    assert len(common) == int(overlap * 40 + 0.5)
    assert set().union(*(set(v) for v in held.values())) == set(ids)  # every patient is somewhere
    assert all(len(set(v)) < 40 for v in held.values()) or overlap == 1.0
    assert holdings(ids, PARTIES, overlap, seed=3) == held  # deterministic


def test_holdings_rejects_a_bad_overlap():
    with pytest.raises(ValueError):
        holdings(["a"], PARTIES, 0.0)


def test_partition_with_overlap_writes_only_held_patients(tiny_data, tmp_path):
    msd, _ = tiny_data
    folders = partition_dataset(msd, tmp_path / "sites", overlap=0.5, seed=1, progress=False)
    expected = holdings([f"BRATS_00{i}" for i in range(1, 9)], PARTIES, 0.5, seed=1)
    for party, folder in folders.items():
        patients = json.loads((folder / "datalist.json").read_text())["patients"]
        assert sorted(patients) == expected[party]
        assert sorted(p.name for p in folder.rglob("*.nii.gz")) == [f"{pid}.nii.gz" for pid in expected[party]]
