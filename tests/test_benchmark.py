"""The benchmark's pieces and one short run of it (centralized and simulator) on a tiny phantom."""

import json
import re

import pytest

from split_unet.launch.benchmark import BenchConfig, add_copied_site, bench, bench_table, site_names
from split_unet.data import SiteImages
from split_unet.studies.missing_modality import evaluate_missing_modalities, missing_modality_table
from split_unet.profiling import peak_memory_mb, step_statistics

from helpers import TINY_SIZE


def test_site_names_repeat_the_modalities_beyond_four():
    assert site_names(2) == ["flair", "t1w"]
    assert site_names(8) == ["flair", "t1w", "t1gd", "t2w", "flair2", "t1w2", "t1gd2", "t2w2"]


def test_copied_site_reads_the_source_images(tiny_data):
    _, sites = tiny_data
    folder = add_copied_site(sites, "flair2", source="flair")
    try:
        copy, source = SiteImages(folder, TINY_SIZE), SiteImages(sites / "flair", TINY_SIZE)
        assert copy.site == "flair2" and copy.modality == "flair"
        assert copy.patient_ids == source.patient_ids
        assert (copy.get(copy.patient_ids[0]) == source.get(source.patient_ids[0])).all()
    finally:
        (folder / "datalist.json").unlink()
        folder.rmdir()


def test_float16_size_of_the_levels_sent():
    config = BenchConfig(size=32, batch_size=2, channels=(4, 8, 16))
    assert config.float16_bytes() == 2 * (4 * 32 ** 3 + 8 * 16 ** 3 + 16 * 8 ** 3) * 2


def test_step_statistics_leave_out_the_warmup_step():
    stats = step_statistics([10.0, 1.0, 2.0, 3.0])
    assert stats["steps"] == 3 and stats["median"] == 2.0 and stats["p10"] >= 1.0 and stats["p90"] <= 3.0
    assert peak_memory_mb() > 10


def test_the_bench_the_readme_cites_shows_every_mode_and_the_ratios_it_quotes(project_root):
    readme = (project_root / "README.md").read_text()
    cited = re.findall(r"\[([^\]]+)\]\((docs/performance/bench[^)]*\.json)\) ([0-9.]+)x / ([0-9.]+)x", readme)
    assert {path for _, path, _, _ in cited} == {"docs/performance/bench.json", "docs/performance/bench_push.json"}
    for _, path, simulator, poc in cited:
        modes = json.loads((project_root / path).read_text())["modes"]
        assert set(modes) == {"centralized", "simulator", "poc"}
        assert (f"{modes['simulator']['ratio_to_centralized']:.2f}", f"{modes['poc']['ratio_to_centralized']:.2f}") \
            == (simulator, poc)


@pytest.mark.simulator
def test_bench_runs_centralized_and_simulator(tmp_path):
    config = BenchConfig(size=TINY_SIZE, patients=8, epochs=1, channels=(4, 8, 16))
    results = bench(tmp_path / "bench", config, modes=("centralized", "simulator"), progress=lambda _: None)
    assert json.loads((tmp_path / "bench" / "bench.json").read_text()) == results
    central, simulator = results["modes"]["centralized"], results["modes"]["simulator"]
    assert "error" not in simulator, simulator.get("error")
    assert central["step_seconds"]["steps"] == simulator["step_seconds"]["steps"] == 2  # 3 steps, 1 left out
    assert central["ratio_to_centralized"] == 1.0 and simulator["ratio_to_centralized"] > 0
    assert simulator["round_trips_per_step"] == 1
    assert 1.0 <= simulator["bytes_vs_float16"] <= 1.01
    assert simulator["peak_memory_mb"]["server"] > 100 and simulator["peak_memory_mb"]["site"] > 100
    extra = simulator["federation_cpu_seconds_per_step"]
    assert extra == round(simulator["cpu_seconds_per_step"] - central["cpu_seconds_per_step"], 4)
    if extra > 0:
        assert simulator["mb_per_federation_cpu_second"] == round(simulator["bytes_per_step"] / 1e6 / extra, 1)
    assert len(simulator["server_resident_mb"]) == 3  # one per training step
    # A step's time is the decoder's, the slowest site's and the rest's: each measured, none negative.
    for part in ("decoder_seconds", "site_seconds", "outside_decoder_and_sites_seconds"):
        assert simulator[part]["steps"] == 2 and simulator[part]["median"] > 0, part
    assert simulator["site_seconds"]["median"] < simulator["step_seconds"]["median"]
    table = bench_table(results)
    assert "| simulator |" in table and "simulator, median seconds per step: decoder" in table


def test_missing_modality_dice_of_a_trained_run(trained_tiny, tiny_data):
    workspace, summary = trained_tiny
    result = evaluate_missing_modalities(workspace, tiny_data[1])
    # The reassembled model with every site reproduces the run's own validation.
    assert result["dice"]["none"]["mean"] == pytest.approx(summary["dice"]["mean"], abs=1e-5)
    assert set(result["dice"]) == {"none", "flair", "t1w", "t1gd", "t2w"}
    assert (workspace / "missing_modality.json").is_file()
    assert "without t1gd" in missing_modality_table({"tiny": result})
