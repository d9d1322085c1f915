"""How a trained Split-U-Net copes with an absent site: validation Dice with each single modality missing.

The encoders and the decoder of a ``split-unet simulate`` run are put back together here, on one machine, as
an evaluation after the fact (in a federation the absent site simply sends nothing; the fusion is the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from split_unet.data import SERVER_SITE, SiteImages, SiteLabels, split_patients
from split_unet.errors import DataError
from split_unet.launch.inference import read_training_summary, trained_config
from split_unet.networks import SplitUNet, build_split_unet
from split_unet.files import write_json
from split_unet.training import TrainConfig, dice_without_each_input

RESULT_FILE = "missing_modality.json"


def load_trained_model(workspace: str | Path) -> tuple[SplitUNet, TrainConfig, list[str]]:
    """The composed network of a simulator run: ``(model, train config, sites in encoder order)``."""
    summary = read_training_summary(workspace)
    config = TrainConfig.from_dict(trained_config(summary))
    sites = list(summary["config"]["sites"])
    model = build_split_unet(config.network, (1,) * len(sites), config.seed)
    artefacts = summary["artefacts"]
    for encoder, site in zip(model.encoders, sites):
        path = Path(artefacts["encoders"][site])
        if not path.is_file():
            raise DataError("trained encoder not found", site=site, field=str(path))
        encoder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["encoder"])
    weights = torch.load(artefacts["decoder"], map_location="cpu", weights_only=True)["model"]
    model.decoder.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    return model, config, sites


def evaluate_missing_modalities(workspace: str | Path, sites_dir: str | Path) -> dict:
    """Validation Dice (the run's own validation patients) with all sites and with each one missing.

    Writes ``workspace/missing_modality.json``: ``{"sites": [...], "dice": {"none" | site: {WT, TC, ET, mean}}}``.
    """
    model, config, sites = load_trained_model(workspace)
    sites_dir = Path(sites_dir)
    labels = SiteLabels(sites_dir / SERVER_SITE, config.size, config.spacing, site=SERVER_SITE)
    images = {site: SiteImages(sites_dir / site, config.size, config.spacing, site=site) for site in sites}
    common = set(labels.patient_ids).intersection(*(set(i.patient_ids) for i in images.values()))
    _, val_ids = split_patients(sorted(common), config.val_fraction, config.seed)
    inputs = torch.cat([torch.from_numpy(images[site].batch(val_ids)) for site in sites], dim=1)
    target = torch.from_numpy(labels.batch(val_ids))
    result = {"sites": sites, "validation_cases": len(val_ids),
              "dice": dice_without_each_input(model, inputs, target, sites, config.val_batch_size)}
    write_json(Path(workspace) / RESULT_FILE, result)
    return result


def missing_modality_table(results: Mapping[str, dict]) -> str:
    """Markdown: one row per model, mean Dice with every site and with each site missing (WT/TC/ET in JSON)."""
    sites = next(iter(results.values()))["sites"]
    lines = ["| model | all sites | " + " | ".join(f"without {site}" for site in sites) + " |",
             "|" + "---|" * (len(sites) + 2)]
    for name, result in results.items():
        dice = result["dice"]
        lines.append(f"| {name} | {dice['none']['mean']:.3f} | "
                     + " | ".join(f"{dice[site]['mean']:.3f}" for site in sites) + " |")
    return "\n".join(lines)
