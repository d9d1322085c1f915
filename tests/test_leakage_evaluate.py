"""evaluate_leakage on a hand-made simulator workspace: record, encoder snapshots and summary."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_dataset

from split_unet.data import SiteImages, SiteLabels
from split_unet.errors import DataError
from split_unet.studies import leakage as leakage_study
from split_unet.studies.leakage import OTHER_PATIENTS_FILE, evaluate_leakage
from split_unet.leakage.record import RECORD_FOLDER, SNAPSHOT_FOLDER, RecordedExchange, snapshot_path
from split_unet.networks import NetworkConfig, build_decoder, build_encoder
from split_unet.training import DecoderParty, EncoderParty

SIZE = 16
SITES = ("flair", "t1gd")
AUX = 2  # auxiliary patients per site (16 in the study): patients 3-4 here


@pytest.fixture(autouse=True)
def few_auxiliary_patients(monkeypatch):
    monkeypatch.setattr(leakage_study, "MAX_AUX_IMAGES", AUX)
NETWORK = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), levels=(0, 2))


def _site_run_dir(workspace, site):
    return workspace / "simulator" / site / "simulate_job"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(workspace, data folder): two steps of split learning on two sites, patients 1-2 (3-4 auxiliary, 5-7 neither),
    the server's decoder saved as training left it."""
    root = tmp_path_factory.mktemp("leakage_eval")
    _, data = make_dataset(root, patients=7, size=SIZE)
    workspace = root / "workspace"
    workspace.mkdir()
    decoder_path = workspace / "simulator" / "server" / "simulate_job" / "app_server" / "split_unet_decoder.pt"
    (workspace / "summary.json").write_text(json.dumps(
        {"config": {"size": SIZE, "spacing": None, "network": NETWORK.to_dict(), "sites": list(SITES)},
         "artefacts": {"decoder": str(decoder_path)}}))
    record_dir = workspace / "simulator" / "server" / "simulate_job" / RECORD_FOLDER
    device = torch.device("cpu")
    parties = {site: EncoderParty(build_encoder(NETWORK, k, seed=0), 1e-2, device, site)
               for k, site in enumerate(SITES)}
    server = DecoderParty(build_decoder(NETWORK, len(SITES), seed=0), 1e-2, device)
    ids = SiteImages(data / "flair", SIZE).patient_ids[:2]
    target = SiteLabels(data / "server", SIZE).batch(ids)
    for step in (1, 2):
        features = {}
        for index, (site, party) in enumerate(parties.items()):
            features[site] = party.forward(SiteImages(data / site, SIZE).batch(ids))
            path = snapshot_path(_site_run_dir(workspace, site), step)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"encoder": party.encoder.state_dict(), "network": NETWORK.to_dict(), "site_index": index,
                        "modality": site, "step": step}, path)
        _, gradients = server.train_step(list(features.values()), target)
        for (site, party), gradient in zip(parties.items(), gradients):
            party.backward(gradient)
            RecordedExchange(step, site, list(ids), features[site], gradient).save(record_dir)
    decoder_path.parent.mkdir(parents=True)
    torch.save({"model": server.decoder.state_dict()}, decoder_path)
    return workspace, data


def test_evaluate_writes_results_and_figures_for_every_attack(recorded, tmp_path, monkeypatch):
    workspace, data = recorded
    labels = evaluate_leakage(workspace, data, "labels", out_dir=tmp_path)
    assert set(labels) == set(SITES) and set(labels["flair"]) == {"1", "2"}  # every recorded step by default
    entry = labels["flair"]["1"]
    assert entry["levels"] == [0, 2] and entry["patients"] == 2
    # Every level received is attacked; the entry's scores are the level that leaks most.
    assert set(entry["per_level"]) == {"0", "2"}
    assert entry["dice_wt"] == max(scores["dice_wt"] for scores in entry["per_level"].values())
    assert entry["dice_wt"] == entry["per_level"][str(entry["level"])]["dice_wt"]
    assert entry["dice_wt"] > entry["random_dice_wt"]

    for attack in ("whitebox", "unsplit", "learned", "surrogate", "completion"):
        results = evaluate_leakage(workspace, data, attack, steps=[2], patients=4, iterations=2, out_dir=tmp_path)
        entry = results["t1gd"]["2"]
        # The recorded 2 patients and 2 more as the site would have released them at step 2.
        assert entry["patients"] == 4 and entry["released_patients"] == 2
        assert entry["levels"] == [0, 2] and entry["iterations"] == 2
        # Against the label-aware prior too, whole and tumour, and the residual correlation over it with its null.
        assert {"label_prior_ssim", "label_excess_ssim", "label_prior_tumour_ssim", "label_excess_tumour_ssim",
                "residual_corr", "null_residual_corr_ci", "tumour_residual_corr_margin"} <= set(entry)
        assert entry["label_excess_ssim"] == pytest.approx(entry["ssim"] - entry["label_prior_ssim"])
        assert entry["residual_corr_patients"] == 4
        low, high = entry["null_residual_corr_ci"]
        assert entry["residual_corr_margin"] == pytest.approx(entry["residual_corr"] - high)
        assert set(entry) >= {"ssim", "psnr", "nmi"} and -1 <= entry["ssim"] <= 1
        # Scored next to the atlas of the two patients the server never saw.
        assert entry["prior_patients"] == 2 and -1 <= entry["prior_ssim"] <= 1
        assert entry["excess_ssim"] == pytest.approx(entry["ssim"] - entry["prior_ssim"])
        assert {"residual_ssim", "residual_nmi", "tumour_ssim", "excess_tumour_ssim"} <= set(entry)
        # And next to the better of those two patients' own images, scored as reconstructions.
        assert entry["other_patients"] == 2 and {"other_excess_ssim", "other_excess_tumour_ssim"} <= set(entry)
        assert entry["excess_residual_ssim"] == pytest.approx(entry["residual_ssim"] - entry["other_residual_ssim"])
        if attack == "learned":  # no job config here: the sites added no noise
            assert entry["release_mechanism"] == []

    saved = json.loads((tmp_path / "leakage.json").read_text())
    assert set(saved["attacks"]) == {"labels", "whitebox", "unsplit", "learned", "surrogate", "completion"}
    assert saved["attacks"]["labels"] == labels
    for attack in saved["attacks"]:
        assert (tmp_path / f"leakage_{attack}.png").stat().st_size > 0

    # A later run of an attack merges into the file: steps already there stay.
    evaluate_leakage(workspace, data, "whitebox", steps=[1], patients=2, iterations=1, out_dir=tmp_path)
    saved = json.loads((tmp_path / "leakage.json").read_text())
    assert set(saved["attacks"]["whitebox"]["flair"]) == {"1", "2"}

    # Another patient's image was scored once per site and batch (the 4 patients of step 2, the 2 of step 1: the same
    # recorded patients at both steps), and a later attack takes it from the workspace.
    assert len(json.loads((workspace / OTHER_PATIENTS_FILE).read_text())) == 2 * len(SITES)
    monkeypatch.setattr(leakage_study, "other_patient_similarity", lambda *args: pytest.fail("scored again"))
    again = evaluate_leakage(workspace, data, "unsplit", steps=[1], patients=2, iterations=1, out_dir=tmp_path)
    reference = saved["attacks"]["whitebox"]["flair"]["1"]["other_residual_ssim"]
    assert again["flair"]["1"]["other_residual_ssim"] == reference


def test_released_patients_are_what_the_site_sends_at_that_step_and_never_auxiliary(recorded):
    workspace, data = recorded
    context = leakage_study._Context(workspace, data, seed=0, iterations=1)
    exchange = RecordedExchange.load(workspace / "simulator" / "server" / "simulate_job" / RECORD_FOLDER
                                     / "step_000002" / "t1gd.pt")
    released = context.released(exchange, 8)
    auxiliary = context.auxiliary_patients("t1gd")
    # The 2 recorded patients, then the 3 that are neither recorded nor auxiliary: 5 of the 7.
    assert released.patient_ids[:2] == exchange.patient_ids and len(released.patient_ids) == 5
    assert not set(released.patient_ids) & set(auxiliary)
    for level, tensor in exchange.activations.items():
        assert torch.equal(released.activations[level][:2], tensor.float())
    snapshot = torch.load(snapshot_path(_site_run_dir(workspace, "t1gd"), 2), weights_only=True)
    encoder = build_encoder(NETWORK, 1, seed=0)
    encoder.load_state_dict(snapshot["encoder"])
    with torch.no_grad():
        expected = encoder.eval()(torch.from_numpy(SiteImages(data / "t1gd", SIZE).batch(released.patient_ids[2:])))
    for level in exchange.activations:
        assert torch.allclose(released.activations[level][2:], expected[level], atol=1e-6)
    assert context.released(exchange, 2).patient_ids == exchange.patient_ids  # no more than asked for


def test_released_patients_keep_the_wires_precision_without_overflowing_float16(recorded, tmp_path):
    """An encoder whose features exceed float16's range (65504) still reaches the server finite: the wire scales
    by max|x| before its float16 cast, and the replay must too (a plain cast made them Inf, then NaN)."""
    workspace, data = recorded
    copy = tmp_path / "workspace"
    shutil.copytree(workspace, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["config"]["wire_dtype"] = "float16"
    (copy / "summary.json").write_text(json.dumps(summary))
    path = snapshot_path(_site_run_dir(copy, "t1gd"), 2)
    snapshot = torch.load(path, weights_only=True)
    snapshot["encoder"]["blocks.2.residual.weight"] *= 1e6  # the deepest level's unnormalised branch
    torch.save(snapshot, path)
    encoder = build_encoder(NETWORK, 1, seed=0)
    encoder.load_state_dict(snapshot["encoder"])
    context = leakage_study._Context(copy, data, seed=0, iterations=1)
    exchange = RecordedExchange.load(copy / "simulator" / "server" / "simulate_job" / RECORD_FOLDER
                                     / "step_000002" / "t1gd.pt")
    released = context.released(exchange, 5)
    with torch.no_grad():
        expected = encoder.eval()(torch.from_numpy(SiteImages(data / "t1gd", SIZE).batch(released.patient_ids[2:])))
    assert expected[2].abs().max() > 65504
    for level in exchange.activations:
        sent = released.activations[level][2:]
        assert torch.isfinite(sent).all()
        # float16 keeps 11 significant bits of x / max|x|: an error of at most half a unit there, times max|x|.
        assert (sent - expected[level]).abs().max() <= expected[level].abs().max() * 2.0 ** -11


def test_model_completion_uses_the_servers_decoder_and_needs_no_encoder_of_the_site(recorded, tmp_path):
    workspace, data = recorded
    copy = tmp_path / "workspace"
    shutil.copytree(workspace, copy, ignore=shutil.ignore_patterns(SNAPSHOT_FOLDER))
    results = evaluate_leakage(copy, data, "completion", steps=[1], patients=2, iterations=2, out_dir=tmp_path,
                               reference=False)
    assert set(results) == set(SITES) and "residual_corr" in results["flair"]["1"]
    assert "other_residual_ssim" not in results["flair"]["1"]  # another patient's image left out, as asked
    summary = json.loads((copy / "summary.json").read_text())
    Path(summary["artefacts"]["decoder"].replace(str(workspace), str(copy))).unlink()
    summary["artefacts"]["decoder"] = summary["artefacts"]["decoder"].replace(str(workspace), str(copy))
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match="decoder"):
        evaluate_leakage(copy, data, "completion", steps=[1], patients=2, iterations=1, out_dir=tmp_path)


def test_model_completion_inverts_each_sites_surrogate_once_for_every_step(recorded, tmp_path, monkeypatch):
    # The completion encoders and the site's release mechanism are the run's, not the step's: one inversion decoder
    # per site serves every step (it was trained again, to the same weights, at every step).
    workspace, data = recorded
    trained = []
    train = leakage_study.train_inversion_decoder
    monkeypatch.setattr(leakage_study, "train_inversion_decoder",
                        lambda encoder, *args, **kwargs: trained.append(encoder) or train(encoder, *args, **kwargs))
    results = evaluate_leakage(workspace, data, "completion", steps=[1, 2], patients=2, iterations=2,
                               out_dir=tmp_path, reference=False)
    assert {site: sorted(steps) for site, steps in results.items()} == {site: ["1", "2"] for site in SITES}
    assert len(trained) == len(SITES) and len(set(map(id, trained))) == len(SITES)


def test_evaluate_refuses_bad_requests(recorded, tmp_path):
    workspace, data = recorded
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate_leakage(workspace, data, "magic")
    with pytest.raises(ValueError, match="not recorded"):
        evaluate_leakage(workspace, data, "labels", steps=[7], out_dir=tmp_path)
    with pytest.raises(DataError, match="summary.json"):
        evaluate_leakage(tmp_path, data, "labels")
    snapshot = snapshot_path(_site_run_dir(workspace, "flair"), 1)
    hidden = snapshot.with_suffix(".hidden")
    snapshot.rename(hidden)
    try:
        with pytest.raises(DataError, match="no encoder snapshot of step 1"):
            evaluate_leakage(workspace, data, "whitebox", steps=[1], iterations=1, out_dir=tmp_path)
    finally:
        hidden.rename(snapshot)


def test_the_surrogate_attack_needs_no_encoder_of_the_site(recorded, tmp_path):
    workspace, data = recorded
    # The record and the data only: every site's encoder snapshots gone.
    copy = tmp_path / "workspace"
    shutil.copytree(workspace, copy, ignore=shutil.ignore_patterns(SNAPSHOT_FOLDER))
    assert list((copy / "simulator" / "server").rglob("*.pt")) and not list(copy.rglob(SNAPSHOT_FOLDER))
    results = evaluate_leakage(copy, data, "surrogate", steps=[1], patients=2, iterations=2, out_dir=tmp_path)
    assert set(results) == set(SITES) and "residual_ssim" in results["flair"]["1"]
    with pytest.raises(DataError, match="no encoder snapshot"):  # the attacks that do use it cannot run
        evaluate_leakage(copy, data, "learned", steps=[1], patients=2, iterations=1, out_dir=tmp_path)


def test_the_learned_attack_trains_through_the_noise_the_job_put_on_the_site(recorded, tmp_path):
    workspace, data = recorded
    copy = tmp_path / "workspace"
    shutil.copytree(workspace, copy)
    config = _site_run_dir(copy, "t1gd") / "app_t1gd" / "config" / "config_fed_client.json"
    config.parent.mkdir(parents=True)
    noise = {"clip_norm": 10.0, "noise_multiplier": 0.1, "levels": [0]}
    noise_filter = {"path": "split_unet.filters.ActivationClipNoise", "args": noise}
    config.write_text(json.dumps({"task_result_filters": [{"tasks": ["split_unet_train"], "filters": [noise_filter]}]}))
    results = evaluate_leakage(copy, data, "learned", steps=[1], patients=2, iterations=2, out_dir=tmp_path)
    assert results["t1gd"]["1"]["release_mechanism"] == [noise] and results["flair"]["1"]["release_mechanism"] == []
    # A mechanism the attacker cannot rebuild is refused naming the site, and nothing is written.
    before = (tmp_path / "leakage.json").read_text()
    config.write_text(config.read_text().replace('"clip_norm": 10.0', '"clip_norm": -1.0'))
    with pytest.raises(DataError, match="t1gd.*ActivationClipNoise|ActivationClipNoise.*t1gd"):
        evaluate_leakage(copy, data, "learned", steps=[2], patients=2, iterations=2, out_dir=tmp_path)
    assert (tmp_path / "leakage.json").read_text() == before
