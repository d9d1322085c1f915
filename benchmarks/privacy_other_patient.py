"""What another patient's true image scores as a "reconstruction": the leakage scores of knowing nothing.

The privacy report's image targets are stated against the population prior (the atlas). This measures what a
real-looking image that holds nothing of the attacked patient reaches on the same scores: for each site, the
first 16 patients (the auxiliary set, as in ``split-unet leakage``) are each scored against the next patients,
with the atlas of the other 15 (``leakage.metrics.other_patient_similarity``). It sets the residual target
(``studies.privacy_report.TARGET_EXCESS_RESIDUAL_SSIM``) and checks the excess-SSIM margin.

    python benchmarks/privacy_other_patient.py --sites data/phantom64/sites --out runs/other_patient.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from split_unet.data import SiteImages
from split_unet.data.partition import SERVER_SITE
from split_unet.leakage.metrics import other_patient_similarity
from split_unet.studies.leakage import MAX_AUX_IMAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", required=True, help="folder written by `split-unet partition`")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--patients", type=int, default=8, help="attacked patients per site")
    args = parser.parse_args()

    results = {}
    for folder in sorted(p for p in Path(args.sites).iterdir() if p.is_dir() and p.name != SERVER_SITE):
        images = SiteImages(folder, args.size, None, site=folder.name)
        ids = images.patient_ids
        auxiliary, attacked = ids[:MAX_AUX_IMAGES], ids[MAX_AUX_IMAGES:MAX_AUX_IMAGES + args.patients]
        # One patient at a time: the best other image for each patient (an attack entry takes the best one for its
        # batch of 2, which scores less).
        per_patient = [other_patient_similarity(torch.from_numpy(images.batch([pid])),
                                                torch.from_numpy(images.batch(auxiliary))) for pid in attacked]
        results[folder.name] = {name: {"min": min(s[name] for s in per_patient),
                                       "mean": sum(s[name] for s in per_patient) / len(per_patient),
                                       "max": max(s[name] for s in per_patient)}
                                for name in ("other_excess_ssim", "other_residual_ssim")}
        results[folder.name]["patients"] = len(attacked)
        print(folder.name, {name: {k: round(v, 3) for k, v in stats.items()}
                            for name, stats in results[folder.name].items() if isinstance(stats, dict)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
