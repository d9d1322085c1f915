"""What a site's first release gives away under each site-side defence, without a federated run.

The first training step's activations depend only on the site's encoder at that step: its initial weights,
changed only by the site's own privacy warm-up (``TrainConfig.privacy_warmup_steps``). This script builds
that encoder as the job does (``build_encoder``, the site's index, seed 0), warms it up on the site's own
patients, releases two patients' activations (through ``ActivationClipNoise`` where configured) and runs an
image attack on them: the white-box inversion (the encoder's weights known) or the learned decoder (query access,
trained on the 16 auxiliary patients), scored against the population prior (the atlas of those 16 patients of
the site), as ``split-unet leakage`` scores it.

    python benchmarks/privacy_step_one.py --sites data/phantom64/sites --out runs/step_one.json --attack whitebox

The server's gradient plays no part before the first release, so step 1 is the same at every training budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from split_unet.data import SiteImages
from split_unet.filters import ActivationClipNoise
from split_unet.leakage.attacks import learned_inversion, train_inversion_decoder, whitebox_inversion
from split_unet.leakage.metrics import prior_relative_similarity
from split_unet.networks import build_encoder, build_inversion_decoder
from split_unet.studies.leakage import DEFAULT_ITERATIONS, MAX_AUX_IMAGES
from split_unet.training import EncoderParty, InversionAdversary, TrainConfig, mean_image, warmup_batches

SITES = ("flair", "t1w", "t1gd", "t2w")  # the server's site order: a site's index seeds its encoder
LEVEL0_NOISE = {"clip_norm": 1000.0, "noise_multiplier": 0.003, "levels": [0], "seed": 0}
CONFIGURATIONS = {
    "no full-res (no warm-up)": {"network": {"levels": [1, 2, 3]}},
    "no full-res + NoPeek 1.0 + warm-up 24": {"network": {"levels": [1, 2, 3]}, "nopeek_weight": 1.0,
                                              "privacy_warmup_steps": 24},
    "no full-res + adversarial 1.0 + warm-up 24": {"network": {"levels": [1, 2, 3]}, "adversarial_weight": 1.0,
                                                   "privacy_warmup_steps": 24},
    "no full-res + NoPeek 1.0 + adversarial 1.0 + warm-up 24": {"network": {"levels": [1, 2, 3]},
                                                                 "nopeek_weight": 1.0, "adversarial_weight": 1.0,
                                                                 "privacy_warmup_steps": 24},
    "no full-res + NoPeek 1.0 + warm-up 96": {"network": {"levels": [1, 2, 3]}, "nopeek_weight": 1.0,
                                              "privacy_warmup_steps": 96},
    "no full-res + NoPeek 1.0 + warm-up 192": {"network": {"levels": [1, 2, 3]}, "nopeek_weight": 1.0,
                                               "privacy_warmup_steps": 192},
    "all levels + level-0 noise x3 + NoPeek 1.0 + warm-up 24": {"nopeek_weight": 1.0, "privacy_warmup_steps": 24,
                                                                "level0_noise": LEVEL0_NOISE},
    "levels 2-3 (no warm-up)": {"network": {"levels": [2, 3]}},
    # The two narrow-skip runs of the frontier sweep that were never attacked on images (no warm-up).
    "1-channel 2-bit full-res + NoPeek 1.0 (no warm-up)": {
        "network": {"full_res_channels": 1, "full_res_bits": 2}, "nopeek_weight": 1.0},
    "2-channel 1-bit full-res + NoPeek 1.0 (no warm-up)": {
        "network": {"full_res_channels": 2, "full_res_bits": 1}, "nopeek_weight": 1.0},
    "1-channel 2-bit full-res + NoPeek 1.0 on levels 1-3 + warm-up 96": {
        "network": {"full_res_channels": 1, "full_res_bits": 2}, "nopeek_weight": 1.0, "nopeek_levels": [1, 2, 3],
        "privacy_warmup_steps": 96},
}


def first_release(settings: dict, images: SiteImages, modality: str, victims: list[str], train_ids: list[str]):
    """(encoder after the warm-up, released activations of ``victims``)."""
    settings = dict(settings)
    noise = settings.pop("level0_noise", None)
    config = TrainConfig(**settings)
    index = SITES.index(modality)
    encoder = build_encoder(config.network, index, config.seed)
    adversary = None
    if config.adversarial_weight > 0:
        atlas = mean_image(images.batch([pid]) for pid in train_ids)
        adversary = InversionAdversary(build_inversion_decoder(config.network, index, config.seed), atlas,
                                       config.lr, torch.device("cpu"))
    party = EncoderParty(encoder, config.lr, torch.device("cpu"), site=modality, nopeek_weight=config.nopeek_weight,
                         seed=config.seed, amp=False, adversary=adversary, adversarial_weight=config.adversarial_weight,
                         nopeek_levels=config.nopeek_levels)
    if config.privacy_warmup_steps:
        party.warm_up(images.batch(ids) for ids in warmup_batches(train_ids, config.batch_size,
                                                                  config.privacy_warmup_steps, config.seed))
    activations = party.infer(images.batch(victims))
    if noise is not None:
        activations = ActivationClipNoise(**noise).protect(activations)
    return party.encoder.eval(), activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--modalities", default="flair")
    parser.add_argument("--configurations", default="", help="comma-separated names (default: all)")
    parser.add_argument("--attack", default="whitebox", choices=("whitebox", "learned"))
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    names = [n for n in args.configurations.split(",") if n] or list(CONFIGURATIONS)
    for modality in args.modalities.split(","):
        images = SiteImages(Path(args.sites) / modality, 64, site=modality)
        ids = sorted(images.patient_ids)
        aux, victims, train_ids = ids[:MAX_AUX_IMAGES], ids[MAX_AUX_IMAGES:MAX_AUX_IMAGES + 2], ids[MAX_AUX_IMAGES:]
        atlas = mean_image(images.batch([pid]) for pid in aux)
        truth = torch.as_tensor(images.batch(victims))
        for name in names:
            if name in results.get(modality, {}).get(args.attack, {}):
                continue
            start = time.time()
            encoder, activations = first_release(CONFIGURATIONS[name], images, modality, victims, train_ids)
            if args.attack == "whitebox":
                reconstruction = whitebox_inversion(encoder, activations, truth.shape[2:],
                                                    iterations=DEFAULT_ITERATIONS["whitebox"])
            else:
                decoder = train_inversion_decoder(encoder, torch.as_tensor(images.batch(aux)), sorted(activations),
                                                  iterations=DEFAULT_ITERATIONS["learned"])
                reconstruction = learned_inversion(decoder, activations)
            scores = prior_relative_similarity(reconstruction, truth, atlas)
            scores["seconds"] = round(time.time() - start)
            results.setdefault(modality, {}).setdefault(args.attack, {})[name] = scores
            out.write_text(json.dumps(results, indent=2))
            print(modality, args.attack, name, {k: round(v, 3) for k, v in scores.items()
                                   if k in ("ssim", "prior_ssim", "excess_ssim", "residual_ssim", "seconds")},
                  flush=True)


if __name__ == "__main__":
    main()
