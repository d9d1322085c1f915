"""Run one attack on a simulator workspace's leakage record and score it against the true data.

Inputs, as ``split-unet simulate`` leaves them::

    workspace/summary.json                                 # config: size, spacing, network
    workspace/simulator/server/simulate_job/leakage_record/  # what the server saw (see ``record``)
    workspace/simulator/<site>/simulate_job/encoder_snapshots/step_000001.pt

and the partitioned data folder (``<data_dir>/<site>/`` images, ``<data_dir>/server/`` labels), from
which the true images and labels are joined by patient id. Results are merged into
``leakage.json`` and drawn in ``leakage_<attack>.png``.

Every reconstruction is scored next to the population prior: the atlas (mean image) of the auxiliary
patients of the same modality, the patients the server never saw from that site (the learned attack's
training data), scored against each attacked patient the same way, with no activations at all
(``leakage.metrics.prior_relative_similarity``), and next to the best auxiliary patient's own image, scored
as a reconstruction (``leakage.metrics.other_patient_similarity``): patient-specific content counts only where
the residual from the atlas resembles the patient's more than another patient's does. The server holds each
patient's labels too: every reconstruction is also scored against the label-aware prior (the atlas with the
patient's labels painted on it, ``leakage.metrics.label_aware_prior``), on the whole volume and in the tumour region,
and by the residual correlation over it with its null from the batch's other patients
(``leakage.metrics.residual_correlation``).

A recorded batch holds the job's batch size of patients (2 by default), too few for an interval over patients: the
image attacks are run on ``patients`` per step (default 8), the recorded ones and, for the rest, what the site would
have released for others of its patients at that step (its encoder snapshot of that step, the levels it sent and its
release mechanism, ``release_mechanism``), never one of the auxiliary patients.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from split_unet.data import SiteImages, SiteLabels
from split_unet.data.partition import SERVER_SITE
from split_unet.errors import DataError
from split_unet.filters import ActivationClipNoise
from split_unet.networks import FusionDecoder, ModalityEncoder, NetworkConfig, build_decoder
from split_unet.files import load_json, write_json
from split_unet.protocol import codecs
from split_unet.protocol.wire import TASK_TRAIN
from split_unet.studies import ATTACKS
from split_unet.training import select_device
from split_unet.training.objective import segmentation_loss

from split_unet.leakage.attacks import (gradient_label_leakage, learned_inversion, random_mask_like,
                                        surrogate_inversion, train_completion_encoders, train_inversion_decoder,
                                        train_surrogate_autoencoder, unsplit_inversion, whitebox_inversion)
from split_unet.leakage.figures import mask_grid, reconstruction_grid
from split_unet.leakage.metrics import (label_aware_prior, mask_dice, orient_sign, other_patient_similarity,
                                        prior_relative_similarity, residual_correlation, subregion_means, subregions,
                                        tumour_surroundings)
from split_unet.leakage.record import RECORD_FOLDER, RecordedExchange, snapshot_path, step_folder

__all__ = ["ATTACKS", "DEFAULT_ITERATIONS", "DEFAULT_PATIENTS", "LEAKAGE_FILE", "MAX_AUX_IMAGES", "RECONSTRUCTIONS",
           "THREAT_MODELS", "evaluate_leakage", "steps_to_attack", "worst_case"]

# Who can run which attack. The honest-but-curious server holds what it receives and sends, its labels, its decoder
# and public auxiliary data, never a site's encoder: the encoders stay at their sites for training and inference. A
# leaked encoder (its weights, or query access to it) is the worst case if one ever left its site. The malicious
# server's attack (feature-space hijacking) changes the training and is its own study (``studies.hijacking``).
THREAT_MODELS = {"honest-but-curious server": ("unsplit", "surrogate", "completion", "labels"),
                 "leaked encoder": ("whitebox", "learned")}
# Attacks that cannot tell the contrast's sign (an encoder they fit or train may negate it): scored sign-invariantly.
SIGN_BLIND = ("unsplit", "surrogate")
# What the worst case of the image attacks is taken on: the excess over the prior, the patient-specific
# content (residual from the atlas, raw and over another patient's image) and the tumour region's excess, each
# maximised on its own.
IMAGE_LEAKAGE = ("excess_ssim", "residual_ssim", "excess_residual_ssim", "excess_tumour_ssim")
# The same against the label-aware prior, and the residual correlation over it: its margin over the null's interval
# (at most 0: no more patient-specific signal than another patient's reconstruction), whole volume and tumour region.
LABEL_PRIOR_LEAKAGE = ("label_excess_ssim", "label_excess_tumour_ssim", "residual_corr_margin",
                       "tumour_residual_corr_margin")
# Entries scored before the label-aware prior lack these: ``steps_to_attack`` attacks them again.
SCORED = "residual_corr_margin"
DEFAULT_PATIENTS = 8
# Sized so that one attack on 4 sites x 2 steps x 2 patients of 64^3 (default network) takes about 5 minutes
# on 2 shared CPU cores: measured ~0.9 s per encoder forward/backward of 2 patients (white-box), ~1.6 s per
# UnSplit step, ~0.7 s per inversion-decoder step. Such budgets under-estimate leakage (UnSplit and the
# learned decoder most): raise them for reported numbers. The surrogate attack spends its budget twice: on
# training its surrogate pair (once per site) and on fitting the adaptor (per site and step).
DEFAULT_ITERATIONS = {"whitebox": 40, "unsplit": 25, "learned": 50, "surrogate": 50, "completion": 50}
MAX_AUX_IMAGES = 16
LEAKAGE_FILE = "leakage.json"
OTHER_PATIENTS_FILE = "other_patient_reference.json"
REGIONS = ("wt", "tc", "et")


def _site_run_dir(workspace: Path, site: str) -> Path:
    return workspace / "simulator" / site / "simulate_job"


def _record_dir(workspace: Path) -> Path:
    return workspace / "simulator" / SERVER_SITE / "simulate_job" / RECORD_FOLDER


def _read_config(workspace: Path) -> dict:
    """The run's training config (``size``, ``spacing``, ``network``) from ``workspace/summary.json``."""
    path = workspace / "summary.json"
    if not path.is_file():
        raise DataError("no summary.json: not a finished `split-unet simulate` workspace", field=str(path))
    config = json.loads(path.read_text()).get("config")
    if not isinstance(config, dict) or "size" not in config or "network" not in config:
        raise DataError("summary.json has no config with 'size' and 'network' (did the run fail?)", field=str(path))
    return config


def _recorded_steps(record_dir: Path) -> list[int]:
    if not record_dir.is_dir():
        raise DataError("no leakage record (run the job with recording on)", field=str(record_dir))
    steps = sorted(int(p.name.removeprefix("step_")) for p in record_dir.glob("step_*") if p.is_dir())
    if not steps:
        raise DataError("the leakage record is empty", field=str(record_dir))
    return steps


def _recorded_patients(record_dir: Path, site: str) -> set[str]:
    """Every patient whose activations the server saw from ``site``, at any recorded step."""
    # mmap: read the patient ids without reading the tensors.
    return {pid for path in record_dir.glob(f"step_*/{site}.pt")
            for pid in torch.load(path, mmap=True, weights_only=True)["patient_ids"]}


# The names a job or a privacy scope gives the site's noise mechanism (``protocol.settings.CLASS_ALLOW_LIST``).
NOISE_FILTER_PATHS = ("split_unet.filters.ActivationClipNoise",
                      "split_unet.filters.activation_privacy.ActivationClipNoise")


def _noise_specs(filters: list, where: Path) -> list[dict]:
    """The ``ActivationClipNoise`` args among ``filters`` (``{"path", "args"}`` specs), in their order."""
    if not isinstance(filters, list):
        raise DataError("task_result_filters is not a list", field=str(where))
    return [spec.get("args", {}) for spec in filters if spec.get("path") in NOISE_FILTER_PATHS]


def _job_noise_specs(filter_groups: list, where: Path) -> list[dict]:
    """The noise of a job's ``task_result_filters``: groups of filters, each for some tasks; those covering training
    answers count."""
    if not isinstance(filter_groups, list):
        raise DataError("task_result_filters is not a list", field=str(where))
    return [args for group in filter_groups
            if TASK_TRAIN in group.get("tasks", ["*"]) or "*" in group.get("tasks", ["*"])
            for args in _noise_specs(group.get("filters", []), where)]


def release_mechanism(workspace: Path, site: str) -> list[dict]:
    """The ``ActivationClipNoise`` args of the noise ``site`` put on its training activations, in the order applied:
    the job's filters (the client config the server sent), then those of the privacy scope the site applied (the
    scope the job's ``meta.json`` asks for, else the site's default). The server wrote the job; the scope's
    parameters it is assumed to know (Kerckhoffs: the noise's multiplier arrives with every answer, its clip norm
    can be read off the activations' norms)."""
    run_dir = _site_run_dir(workspace, site)
    client_config = run_dir / f"app_{site}" / "config" / "config_fed_client.json"
    specs = _job_noise_specs(load_json(client_config).get("task_result_filters", []), client_config) \
        if client_config.is_file() else []
    policy_path = workspace / "simulator" / site / "local" / "privacy.json"
    if policy_path.is_file():
        policy = load_json(policy_path)
        meta = run_dir / "meta.json"
        scope_name = (load_json(meta).get("scope") if meta.is_file() else None) or policy.get("default_scope")
        scopes = [scope for scope in policy.get("scopes", []) if scope.get("name") == scope_name]
        # A scope's task_result_filters are filter specs, not groups (NVFlare's ``PrivacyConfiger`` builds every
        # entry as a component and applies it to every task).
        specs += [args for scope in scopes for args in _noise_specs(scope.get("task_result_filters", []),
                                                                    policy_path)]
    return specs


def _load_snapshot_encoder(workspace: Path, site: str, step: int, device: torch.device) -> ModalityEncoder:
    """The site's encoder with its weights of ``step`` (what produced the recorded activations)."""
    path = snapshot_path(_site_run_dir(workspace, site), step)
    if not path.is_file():
        raise DataError(f"no encoder snapshot of step {step} (the site must keep snapshots)", site=site,
                        field=str(path))
    snapshot = torch.load(path, map_location=device, weights_only=True)
    config = NetworkConfig.from_dict(snapshot["network"])
    encoder = ModalityEncoder(config.spatial_dims, 1, **config.encoder_args())
    encoder.load_state_dict(snapshot["encoder"])
    return encoder.to(device)


class _Context:
    """What the attacks of one evaluation share: paths, data readers, settings."""

    def __init__(self, workspace: Path, data_dir: Path, seed: int, iterations: int, reference: bool = True):
        self.workspace = workspace
        self.reference = reference
        self.data_dir = data_dir
        self.config = _read_config(workspace)
        self.size = int(self.config["size"])
        self.spacing = self.config.get("spacing")
        self.network = NetworkConfig.from_dict(self.config["network"])
        self.record_dir = _record_dir(workspace)
        self.seed = seed
        self.iterations = iterations
        self.device = select_device()
        self._images: dict[str, SiteImages] = {}
        self._labels: SiteLabels | None = None
        self._atlases: dict[str, torch.Tensor] = {}
        self._surrogates: dict[tuple[str, tuple[int, ...]], tuple[ModalityEncoder, FusionDecoder]] = {}
        self._subregion_means: dict[str, dict[int, float]] = {}
        self._completion: list[ModalityEncoder] | None = None
        self._completion_decoders: dict[tuple[str, tuple[int, ...]], FusionDecoder] = {}

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.size,) * self.network.spatial_dims

    def images(self, site: str) -> SiteImages:
        if site not in self._images:
            self._images[site] = SiteImages(self.data_dir / site, self.size, self.spacing, site=site)
        return self._images[site]

    def labels(self) -> SiteLabels:
        if self._labels is None:
            self._labels = SiteLabels(self.data_dir / SERVER_SITE, self.size, self.spacing, site=SERVER_SITE)
        return self._labels

    def true_images(self, site: str, patient_ids: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(self.images(site).batch(patient_ids))

    def whole_tumour(self, patient_ids: Sequence[str]) -> torch.Tensor:
        """(B, *S) bool WT masks."""
        return torch.from_numpy(self.labels().batch(patient_ids)[:, 0] > 0)

    def auxiliary_patients(self, site: str) -> list[str]:
        """Up to ``MAX_AUX_IMAGES`` of the site's patients whose activations the server never saw."""
        seen = _recorded_patients(self.record_dir, site)
        held_out = [pid for pid in self.images(site).patient_ids if pid not in seen][:MAX_AUX_IMAGES]
        if not held_out:
            raise DataError("no patients outside the recorded batches for the prior and the inversion decoder",
                            site=site)
        return held_out

    def atlas(self, site: str) -> torch.Tensor:
        """(1, *S): the mean image of the site's auxiliary patients, the population prior of its modality."""
        if site not in self._atlases:
            self._atlases[site] = self.true_images(site, self.auxiliary_patients(site)).mean(dim=0)
        return self._atlases[site]

    def label_prior(self, site: str, patient_ids: Sequence[str]) -> torch.Tensor:
        """(B, 1, *S): ``label_aware_prior`` of ``patient_ids``: the atlas with their labels (the server's) painted
        at the auxiliary patients' mean intensity of each sub-region."""
        if site not in self._subregion_means:
            auxiliary = self.auxiliary_patients(site)
            self._subregion_means[site] = subregion_means(self.true_images(site, auxiliary),
                                                          subregions(self.labels().batch(auxiliary)))
        return torch.from_numpy(label_aware_prior(self.atlas(site), subregions(self.labels().batch(patient_ids)),
                                                  self._subregion_means[site]))

    def sites(self) -> list[str]:
        """The sites in the decoder's input order (the run's summary)."""
        return list(self.config["sites"])

    def completion_encoders(self) -> dict[str, ModalityEncoder]:
        """Model completion: surrogate encoders trained through the server's own trained decoder (frozen) on the
        patients no site's activations were recorded of (public auxiliary data), one per site, trained once."""
        if self._completion is None:
            sites = self.sites()
            auxiliary = sorted(set.intersection(*(set(self.auxiliary_patients(site)) for site in sites)))
            images = torch.cat([self.true_images(site, auxiliary) for site in sites], dim=1)
            target = torch.from_numpy(self.labels().batch(auxiliary)).float()
            self._completion = train_completion_encoders(
                self.architecture, self.trained_decoder(), images, target, segmentation_loss(),
                iterations=self.iterations, seed=self.seed, device=self.device)
        return dict(zip(self.sites(), self._completion))

    def completion_decoder(self, site: str, levels: Sequence[int]) -> FusionDecoder:
        """The decoder that inverts ``site``'s completion encoder through the site's release mechanism, trained once
        per site and levels: it depends on neither the step nor the patients attacked (the completion encoders are
        trained once, the mechanism is the run's, its noise drawn from the same seed), so every step reuses it."""
        key = (site, tuple(sorted(levels)))
        if key not in self._completion_decoders:
            self._completion_decoders[key] = train_inversion_decoder(
                self.completion_encoders()[site], self.true_images(site, self.auxiliary_patients(site)), key[1],
                iterations=self.iterations, seed=self.seed,
                release=_released(site, release_mechanism(self.workspace, site), self.seed))
        return self._completion_decoders[key]

    def trained_decoder(self) -> FusionDecoder:
        """The server's decoder as training left it (its own file, ``summary.json``'s artefacts)."""
        path = Path(load_json(self.workspace / "summary.json").get("artefacts", {}).get("decoder", ""))
        if not path.is_file():
            raise DataError("the server's trained decoder is not found", site=SERVER_SITE, field=str(path))
        decoder = build_decoder(self.network, len(self.sites()), seed=self.seed)
        weights = torch.load(path, map_location="cpu", weights_only=True)["model"]
        decoder.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
        return decoder

    def released(self, exchange: RecordedExchange, count: int) -> RecordedExchange:
        """``exchange`` with up to ``count`` patients: the recorded ones first, then what the site would have released
        at that step for its next patients that are neither recorded there nor auxiliary (its encoder snapshot of the
        step, the levels it sent, its release mechanism and the wire's precision)."""
        recorded = list(exchange.patient_ids[:count])
        site = exchange.site
        excluded = set(recorded) | set(self.auxiliary_patients(site))
        extra = [pid for pid in self.images(site).patient_ids if pid not in excluded][:count - len(recorded)]
        activations = {level: t[:len(recorded)].float() for level, t in exchange.activations.items()}
        if extra:
            encoder = _load_snapshot_encoder(self.workspace, site, exchange.step, self.device)
            with torch.no_grad():
                features = encoder.eval()(self.true_images(site, extra).to(self.device))
            features = {level: features[level].cpu() for level in activations}
            release = _released(site, release_mechanism(self.workspace, site), self.seed + exchange.step)
            if release is not None:
                features = release(features)
            # The wire's precision, through its codec: the scaled float16 never overflows, as a plain cast would.
            features = {level: codecs.round_trip(t, self.config.get("wire_dtype") or "float32")
                        for level, t in features.items()}
            activations = {level: torch.cat([t, features[level]]) for level, t in activations.items()}
        return RecordedExchange(exchange.step, site, recorded + extra, activations)

    def other_patient_scores(self, site: str, patient_ids: Sequence[str], region: torch.Tensor) -> dict[str, float]:
        """``other_patient_similarity`` of the auxiliary patients' images against ``patient_ids``, once per batch
        and workspace: kept in ``OTHER_PATIENTS_FILE`` under the data folder, the site and both patient lists, as
        every attack of a sweep asks for the same reference (about 10 s per site and step on 64^3)."""
        auxiliary = self.auxiliary_patients(site)
        key = json.dumps([str(self.data_dir.resolve()), site, list(patient_ids), auxiliary])
        cache_path = self.workspace / OTHER_PATIENTS_FILE
        cache = load_json(cache_path) if cache_path.is_file() else {}
        if key not in cache:
            cache[key] = other_patient_similarity(
                self.true_images(site, patient_ids), self.true_images(site, auxiliary), region)
            write_json(cache_path, cache)
        return cache[key]

    def architecture(self) -> ModalityEncoder:
        """A fresh encoder of the site's architecture: the server knows it from its own job config, nothing else."""
        return ModalityEncoder(self.network.spatial_dims, 1, **self.network.encoder_args())

    def surrogate_pair(self, site: str, levels: Sequence[int]) -> tuple[ModalityEncoder, FusionDecoder]:
        """The attacker's surrogate encoder and decoder for ``site``'s modality, trained once on its auxiliary
        patients (they do not depend on the step attacked)."""
        key = (site, tuple(sorted(levels)))
        if key not in self._surrogates:
            self._surrogates[key] = train_surrogate_autoencoder(
                self.architecture, self.true_images(site, self.auxiliary_patients(site)), key[1],
                iterations=self.iterations, seed=self.seed, device=self.device)
        return self._surrogates[key]


Reconstruct = Callable[[_Context, RecordedExchange], torch.Tensor]


def _whitebox(context: _Context, exchange: RecordedExchange) -> torch.Tensor:
    encoder = _load_snapshot_encoder(context.workspace, exchange.site, exchange.step, context.device)
    return whitebox_inversion(encoder, exchange.activations, context.image_shape, iterations=context.iterations,
                              seed=context.seed)


def _unsplit(context: _Context, exchange: RecordedExchange) -> torch.Tensor:
    return unsplit_inversion(context.architecture, exchange.activations, context.image_shape,
                             iterations=context.iterations, seed=context.seed, device=context.device)


def _released(site: str, mechanism: Sequence[dict], seed: int) -> Callable[[dict], dict] | None:
    """``release_mechanism``'s filters applied in turn to ``{level: features}`` (None where there are none), drawing
    the attacker's own noise from ``seed``."""
    if not mechanism:
        return None
    try:
        filters = [ActivationClipNoise(**{**args, "seed": seed}) for args in mechanism]
    except (TypeError, ValueError) as error:
        raise DataError(f"not a usable ActivationClipNoise config: {error}", site=site,
                        field=str(list(mechanism))) from error

    def release(features: dict) -> dict:
        for noise in filters:
            features = noise.protect(features)
        return features
    return release


def _learned(context: _Context, exchange: RecordedExchange) -> torch.Tensor:
    site = exchange.site
    encoder = _load_snapshot_encoder(context.workspace, site, exchange.step, context.device)
    release = _released(site, release_mechanism(context.workspace, site), context.seed)
    decoder = train_inversion_decoder(encoder, context.true_images(site, context.auxiliary_patients(site)),
                                      sorted(exchange.activations), iterations=context.iterations,
                                      seed=context.seed, release=release)
    return learned_inversion(decoder, exchange.activations)


def _surrogate(context: _Context, exchange: RecordedExchange) -> torch.Tensor:
    # No query access: neither the site's encoder nor its snapshot is loaded.
    site = exchange.site
    encoder, decoder = context.surrogate_pair(site, sorted(exchange.activations))
    return surrogate_inversion(encoder, decoder, context.true_images(site, context.auxiliary_patients(site)),
                               exchange.activations, iterations=context.iterations)


def _completion(context: _Context, exchange: RecordedExchange) -> torch.Tensor:
    # The server's own decoder and labels, public images; neither the site's encoder nor its snapshot is loaded.
    return learned_inversion(context.completion_decoder(exchange.site, sorted(exchange.activations)),
                             exchange.activations)


RECONSTRUCTIONS: dict[str, Reconstruct] = {"whitebox": _whitebox, "unsplit": _unsplit, "learned": _learned,
                                           "surrogate": _surrogate, "completion": _completion}


def _score_reconstruction(context: _Context, attack: str, exchange: RecordedExchange,
                          recorded_patients: int) -> tuple[dict, tuple]:
    """(result entry, figure row) of one reconstruction attack on one exchange (``context.released``), whose first
    ``recorded_patients`` were recorded."""
    reconstruction = RECONSTRUCTIONS[attack](context, exchange).cpu()
    truth = context.true_images(exchange.site, exchange.patient_ids)
    region = tumour_surroundings(context.whole_tumour(exchange.patient_ids))
    if attack in SIGN_BLIND:  # the sign chosen once, against the truth, for every score below
        reconstruction = torch.from_numpy(orient_sign(reconstruction, truth))
    label_prior = context.label_prior(exchange.site, exchange.patient_ids)
    against_labels = prior_relative_similarity(reconstruction, truth, label_prior, region)
    entry = {"levels": sorted(exchange.activations), "patients": len(exchange.patient_ids),
             "released_patients": len(exchange.patient_ids) - recorded_patients,
             "iterations": context.iterations, "prior_patients": len(context.auxiliary_patients(exchange.site)),
             **prior_relative_similarity(reconstruction, truth, context.atlas(exchange.site), region),
             **{f"label_{name}": against_labels[name] for name in
                ("prior_ssim", "excess_ssim", "prior_tumour_ssim", "excess_tumour_ssim") if name in against_labels},
             **residual_correlation(reconstruction, truth, label_prior, region)}
    if context.reference:
        entry.update(context.other_patient_scores(exchange.site, exchange.patient_ids, region))
        entry["excess_residual_ssim"] = entry["residual_ssim"] - entry["other_residual_ssim"]
    if attack == "learned":  # what its decoder trained on: features as the site releases them
        entry["release_mechanism"] = release_mechanism(context.workspace, exchange.site)
    row = (f"{exchange.site} step {exchange.step}", truth[0, 0].numpy(), reconstruction[0, 0].numpy())
    return entry, row


def _score_labels(context: _Context, exchange: RecordedExchange) -> tuple[dict, tuple]:
    """(result entry, figure row) of the gradient label attack on one exchange, at every level received.

    The entry's top-level scores are those of the level whose estimate matches WT best: the site reads every
    level it receives, and choosing by the truth makes this an upper bound of what it can tell. ``per_level``
    keeps each level's.
    """
    if not exchange.gradients:
        raise DataError(f"no gradients recorded at step {exchange.step}", site=exchange.site)
    regions = torch.from_numpy(context.labels().batch(exchange.patient_ids)) > 0  # (B, 3, *S): WT, TC, ET
    per_level, estimates = {}, {}
    for level in sorted(exchange.gradients):
        estimate = gradient_label_leakage(exchange.gradients, context.image_shape, level)
        chance = random_mask_like(estimate, context.seed)
        scores = {"mask_fraction": float(estimate.float().mean())}
        for index, region in enumerate(REGIONS):
            scores[f"dice_{region}"] = mask_dice(estimate, regions[:, index])
            scores[f"random_dice_{region}"] = mask_dice(chance, regions[:, index])
        per_level[str(level)], estimates[level] = scores, estimate
    level = max(estimates, key=lambda lv: per_level[str(lv)]["dice_wt"])
    entry = {"levels": sorted(exchange.gradients), "level": level, "patients": len(exchange.patient_ids),
             **per_level[str(level)], "per_level": per_level}
    row = (f"{exchange.site} step {exchange.step} level {level}", regions[0, 0].numpy(), estimates[level][0].numpy())
    return entry, row


def _merge(path: Path, attack: str, results: dict) -> dict:
    """Merge ``results`` ({site: {step: entry}}) under ``attacks.<attack>`` of the JSON file; return it all."""
    document = json.loads(path.read_text()) if path.is_file() else {}
    sites = document.setdefault("attacks", {}).setdefault(attack, {})
    for site, steps in results.items():
        sites.setdefault(site, {}).update(steps)
    write_json(path, document)
    return document


def evaluate_leakage(workspace: str | Path, data_dir: str | Path, attack: str, steps: Sequence[int] | None = None,
                     patients: int = DEFAULT_PATIENTS, seed: int = 0, iterations: int | None = None,
                     out_dir: str | Path | None = None, reference: bool = True) -> dict:
    """Run ``attack`` on every recorded site at ``steps`` and score it against the true data.

    Args:
        workspace: a ``split-unet simulate`` workspace whose server recorded the exchanges.
        data_dir: the partitioned data folder the run used (true images and labels).
        attack: ``"whitebox"`` (site's encoder weights, upper bound), ``"unsplit"`` (architecture only),
            ``"learned"`` (decoder trained on held-out patients of the site through its encoder and the noise it
            adds, ``release_mechanism``), ``"surrogate"``
            (a surrogate encoder and decoder trained on those patients without the site's encoder, adapted to the
            recorded activations) or
            ``"labels"`` (tumour mask from the gradients the site received).
        steps: recorded steps to attack (default: every recorded step; an attacker takes the best).
        patients: patients per step of the image attacks: the recorded batch's and, where it holds fewer, what the
            site would have released at that step for as many more (``_Context.released``). The label attack reads
            the recorded batch (the gradients of others were never sent).
        seed: seed of every attack.
        iterations: optimisation budget (default ``DEFAULT_ITERATIONS[attack]``; unused for labels).
        out_dir: where ``leakage.json`` and ``leakage_<attack>.png`` go (default: ``workspace``).
        reference: score the best auxiliary patient's image too (``other_*``, ``excess_residual_ssim``): 16 images
            against every patient of every batch, the evaluation's largest cost on a busy CPU (about a minute of CPU
            per site and step for 8 patients of 64^3); the label-aware prior's measures do not need it.

    Returns:
        ``{site: {step: entry}}`` for this attack, as merged into ``leakage.json`` under ``attacks.<attack>``.
        An entry holds ``levels``, ``patients`` and either, for reconstructions (``SIGN_BLIND`` attacks scored
        sign-invariantly), ``ssim``, ``psnr``, ``nmi`` with the prior's (``prior_<m>``, ``excess_<m>``), the
        residual's (``residual_ssim``, ``residual_nmi``) and the tumour region's (``tumour_<m>``,
        ``prior_tumour_<m>``, ``excess_tumour_<m>``), see ``prior_relative_similarity``, and
        ``prior_patients``; the best auxiliary patient's image scored the same way (``other_excess_ssim``,
        ``other_residual_ssim``, ``other_excess_tumour_ssim``, ``other_patients``: ``other_patient_similarity``)
        and ``excess_residual_ssim`` = ``residual_ssim`` - ``other_residual_ssim``, and for ``"learned"``
        ``release_mechanism`` (the noise its decoder trained through); or, for labels,
        ``dice_<region>`` and ``random_dice_<region>`` for WT, TC, ET of the level that leaks most (``level``)
        and the same for every level received (``per_level``).

    Raises:
        ValueError: an unknown attack or a step that was not recorded.
        DataError: a missing summary, record, snapshot or data folder.
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; expected one of {ATTACKS}")
    workspace = Path(workspace)
    out_dir = Path(out_dir) if out_dir is not None else workspace
    context = _Context(workspace, Path(data_dir), seed, iterations or DEFAULT_ITERATIONS.get(attack, 0), reference)
    recorded = _recorded_steps(context.record_dir)
    steps = recorded if steps is None else sorted(set(steps))
    missing = sorted(set(steps) - set(recorded))
    if missing:
        raise ValueError(f"steps {missing} were not recorded; recorded: {recorded[0]}..{recorded[-1]}")

    results: dict[str, dict[str, dict]] = {}
    rows = []
    for step in steps:
        for path in sorted((context.record_dir / step_folder(step)).glob("*.pt")):
            exchange = RecordedExchange.load(path)
            if attack == "labels":
                entry, row = _score_labels(context, exchange)
            else:
                entry, row = _score_reconstruction(context, attack, context.released(exchange, patients),
                                                   min(patients, len(exchange.patient_ids)))
            results.setdefault(exchange.site, {})[str(step)] = entry
            rows.append(row)

    _merge(out_dir / LEAKAGE_FILE, attack, results)
    figure = out_dir / f"leakage_{attack}.png"
    if attack == "labels":
        mask_grid(rows, figure)
    else:
        reconstruction_grid(rows, figure)
    return results


def steps_to_attack(workspace: str | Path, attack: str, per_site: dict) -> list[int]:
    """The recorded steps at which some recorded site has no complete entry of ``attack`` in ``per_site`` (its
    ``leakage.json`` entries): never attacked there, or scored before the prior, another patient's image, every
    level, (learned) the site's release mechanism and the label-aware prior were (older files; another patient's
    image is optional, ``evaluate_leakage``'s ``reference``). An attacker takes the best step, so the
    worst case needs them all."""
    wanted = ("per_level",) if attack == "labels" else (SCORED,) + (
        ("release_mechanism",) if attack == "learned" else ())
    record_dir = _record_dir(Path(workspace))
    return [step for step in _recorded_steps(record_dir)
            if any(not set(wanted) <= set(per_site.get(path.stem, {}).get(str(step), {}))
                   for path in (record_dir / step_folder(step)).glob("*.pt"))]


def worst_case(attacks: dict, only: Sequence[str] | None = None) -> dict:
    """The worst recorded step and the strongest attack, per site, from ``leakage.json``'s ``attacks``.

    Args:
        attacks: ``leakage.json``'s ``attacks``.
        only: the attacks to take the worst case over (default: all), e.g. a threat model's (``THREAT_MODELS``).

    Returns:
        ``{"images": {site: {metric: {"value", "attack", "step"}}}`` for each of ``IMAGE_LEAKAGE`` and
        ``LABEL_PRIOR_LEAKAGE``, maximised over the reconstruction attacks and steps separately (with ``ssim`` and
        ``prior_ssim`` where ``excess_ssim`` peaks, the correlation, its interval and the null's where a
        ``residual_corr_margin`` peaks), and ``{"labels": {site: {"dice_wt", "random_dice_wt", "step", "level"}}}`` at
        the step whose best level matches WT most. Sites or attacks not in ``attacks`` are absent.
    """
    images: dict[str, dict] = {}
    for attack in RECONSTRUCTIONS:
        if only is not None and attack not in only:
            continue
        for site, steps in attacks.get(attack, {}).items():
            worst = images.setdefault(site, {})
            for step, entry in steps.items():
                for metric in IMAGE_LEAKAGE + LABEL_PRIOR_LEAKAGE:
                    if metric in entry and entry[metric] > worst.get(metric, {}).get("value", float("-inf")):
                        worst[metric] = {"value": entry[metric], "attack": attack, "step": int(step)}
                        if metric == "excess_ssim":
                            worst[metric].update(ssim=entry["ssim"], prior_ssim=entry["prior_ssim"])
                        if metric.endswith("residual_corr_margin"):
                            prefix = metric.removesuffix("residual_corr_margin")
                            worst[metric].update({name: entry[f"{prefix}{name}"] for name in (
                                "residual_corr", "residual_corr_ci", "null_residual_corr_ci",
                                "residual_corr_patients")})
    labels = {}
    for site, steps in attacks.get("labels", {}).items() if only is None or "labels" in only else ():
        step, entry = max(steps.items(), key=lambda item: item[1]["dice_wt"])
        labels[site] = {"dice_wt": entry["dice_wt"], "random_dice_wt": entry["random_dice_wt"], "step": int(step),
                        "level": entry["level"]}
    return {"images": images, "labels": labels}
