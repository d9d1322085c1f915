"""Site and server init time and memory for 50, 200 and 1,251 BraTS-2021-style cases, and memory with a bounded
volume cache.

One real-geometry case (int16 T1, uint8 labels, 240 x 240 x 155, 1 mm, LPS-style affine, from ``split-unet synth
--release brats2021``) hard-linked under every case name, so 1,251 cases take the disk of one. Each measurement
runs in a fresh process (its peak memory is its own):

- init: ``SiteImages(...)`` (a modality site) or ``SiteLabels(...)`` (the server) and ``check()`` (headers only)
  for N cases;
- cache: N cases loaded one after another (as steps would) with ``cache_cases`` C, on the grid 240 x 240 x 155 at
  1 mm: resident memory at the end and the peak.

The files are read through the page cache after the first run (the same file under every name): a cold disk adds
one small read per header.

    python benchmarks/site_init.py --root /tmp/site-init --out runs/bench/site_init.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

from split_unet.data import DATALIST, RELEASE_SHAPE, SERVER_SITE, generate_release

# Party -> (file suffix, datalist entries besides "site" and "patients").
PARTIES = {"t1w": ("t1", {"modality": "t1w"}), SERVER_SITE: ("seg", {"convention": "brats"})}


def build_site(root: Path, cases: int, party: str) -> Path:
    """A party's folder of ``cases`` BraTS 2021 cases, every file a hard link of one phantom's file."""
    source = root / "source"
    if not source.is_dir():
        generate_release(source, "brats2021", n_patients=1)
    suffix, entries = PARTIES[party]
    (volume,) = source.glob(f"*/*_{suffix}.nii.gz")
    site = root / f"{cases}_cases" / party
    (site / "files").mkdir(parents=True, exist_ok=True)
    patients = {}
    for index in range(cases):
        pid = f"BraTS2021_{index:05d}"
        patients[pid] = f"files/{pid}_{suffix}.nii.gz"
        if not (site / patients[pid]).exists():
            os.link(volume, site / patients[pid])
    (site / DATALIST).write_text(json.dumps({"site": party, **entries, "patients": patients}))
    return site


def _party(site: str, cache_cases: int = 0):
    from split_unet.data import SiteImages, SiteLabels

    kind = SiteLabels if Path(site).name == SERVER_SITE else SiteImages
    return kind(site, RELEASE_SHAPE, 1.0, cache_cases=cache_cases)


def _rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def measure_init(site: str) -> dict:
    from split_unet.profiling import peak_memory_mb

    before = _rss_mb()
    start = time.perf_counter()
    party = _party(site)
    party.check()
    seconds = time.perf_counter() - start
    return {"party": party.site, "cases": len(party), "init_seconds": round(seconds, 2), "rss_before_mb": before,
            "rss_after_mb": _rss_mb(), "peak_mb": peak_memory_mb()}


def measure_cache(site: str, loads: int, cache_cases: int) -> dict:
    from split_unet.profiling import peak_memory_mb

    party = _party(site, cache_cases)
    party.check()
    before = _rss_mb()
    start = time.perf_counter()
    for pid in party.patient_ids[:loads]:
        party.batch([pid])
    seconds = time.perf_counter() - start
    return {"party": party.site, "cases": len(party), "loaded": loads, "cache_cases": cache_cases,
            "cached": len(party.cached_ids()), "seconds_per_load": round(seconds / loads, 2), "rss_before_mb": before,
            "rss_after_mb": _rss_mb(), "peak_mb": peak_memory_mb()}


def in_fresh_process(function, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/site-init"), help="where the cases are linked")
    parser.add_argument("--out", type=Path, default=Path("site_init.json"))
    parser.add_argument("--cases", default="50,200,1251", help="site sizes to time init for")
    parser.add_argument("--loads", default="20,40", help="cases to load in the cache runs")
    parser.add_argument("--cache-cases", type=int, default=8, help="the bounded cache (compared with 0, no bound)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.cases.split(",")]
    loads = [int(n) for n in args.loads.split(",")]
    results: dict = {"grid": list(RELEASE_SHAPE), "spacing": 1.0, "init": [], "cache": []}
    for party in PARTIES:
        sites = {n: build_site(args.root, n, party) for n in sorted({*counts, max(loads)})}
        for n in counts:
            results["init"].append(in_fresh_process(measure_init, str(sites[n])))
            print("init", results["init"][-1], flush=True)
        for cache_cases, n in [*((args.cache_cases, n) for n in loads), (0, max(loads))]:
            results["cache"].append(in_fresh_process(measure_cache, str(sites[max(sites)]), n, cache_cases))
            print("cache", results["cache"][-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.out}")
    return results


if __name__ == "__main__":
    main()
