"""Site-local privacy defences of issue 14: adversarial training against the site's own inversion decoder,
and the privacy warm-up before the first release."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_NETWORK, TINY_SIZE, init_site, send_task

from split_unet.leakage.record import snapshot_path
from split_unet.networks import NetworkConfig, build_encoder, build_inversion_decoder
from split_unet.protocol.wire import KIND_ACTIVATIONS, TASK_TRAIN, TensorMessage
from split_unet.training import EncoderParty, InversionAdversary, TrainConfig, mean_image, warmup_batches

pytestmark = pytest.mark.unit

NETWORK = NetworkConfig.from_dict(TINY_NETWORK)
SIDE = 8  # the tiny network's three levels at 8^3, 4^3, 2^3: enough for the adversary to matter, fast


def _images(count: int, seed: int, side: int = SIDE) -> torch.Tensor:
    """(count, 1, side^3) smooth random images around one shared 'anatomy', like patients of one modality."""
    generator = torch.Generator().manual_seed(seed)
    anatomy = F.avg_pool3d(torch.randn(1, 1, side, side, side, generator=torch.Generator().manual_seed(99)), 3, 1, 1)
    own = F.avg_pool3d(torch.randn(count, 1, side, side, side, generator=generator), 3, 1, 1)
    return 3 * anatomy + 3 * own


def _adversary(atlas: torch.Tensor, seed: int = 0) -> InversionAdversary:
    return InversionAdversary(build_inversion_decoder(NETWORK, 0, seed), atlas, lr=5e-3, device=torch.device("cpu"))


def _batches(images: torch.Tensor, steps: int) -> list[torch.Tensor]:
    return [images[2 * (k % 4):2 * (k % 4) + 2] for k in range(steps)]


def _own_decoder_mse(adversary: InversionAdversary, encoder, images: torch.Tensor) -> float:
    with torch.no_grad():
        adversary.decoder.eval()
        return float(F.mse_loss(adversary.decoder([encoder.eval()(images)]), images))


def test_adversarial_warm_up_makes_the_sites_own_decoder_worse():
    site = _images(8, 1)
    atlas = mean_image([site])
    # Undefended: the same decoder takes the same 20 steps against the fixed initial encoder.
    undefended, attacker = build_encoder(NETWORK, 0, seed=0), _adversary(atlas)
    for batch in _batches(site, 20):
        with torch.no_grad():
            features = undefended(batch)
        attacker.fit(features, batch)
    party = EncoderParty(build_encoder(NETWORK, 0, seed=0), lr=5e-3, device=torch.device("cpu"),
                         adversary=_adversary(atlas), adversarial_weight=1.0)
    assert party.warm_up(_batches(site, 20)) == 20 and party.warmed_up
    before = _own_decoder_mse(attacker, undefended, site)
    after = _own_decoder_mse(party.adversary, party.encoder, site)
    # Measured 0.080 -> 0.125 (x1.56; the atlas scores 0.236): without the encoder's term the two runs are the
    # same computation (x1.0), so x1.15 separates them with room on both sides.
    assert after > 1.15 * before, (before, after)


def test_the_encoder_term_moves_the_encoder_only():
    images = _images(2, 0)
    encoder = build_encoder(NETWORK, 0, seed=0)
    adversary = _adversary(mean_image([images]))
    adversary.encoder_loss(encoder(images)).backward()
    assert all(p.grad is None for p in adversary.decoder.parameters())
    assert all(p.grad is not None for p in encoder.parameters())
    assert all(p.requires_grad for p in adversary.decoder.parameters())


def test_backward_adds_the_adversarial_term_to_the_server_gradient():
    images = _images(2, 0)

    def stepped(weight: float) -> tuple[list[torch.Tensor], EncoderParty]:
        party = EncoderParty(build_encoder(NETWORK, 0, seed=0), lr=5e-3, device=torch.device("cpu"),
                             adversary=_adversary(mean_image([images])), adversarial_weight=weight)
        features = party.forward(images)
        party.backward({level: torch.full_like(t, 1e-3) for level, t in features.items()})
        return [p.detach().clone() for p in party.encoder.parameters()], party

    plain, _ = stepped(0.0)
    defended, party = stepped(1.0)
    assert any(not torch.equal(a, b) for a, b in zip(plain, defended))
    assert party.last_adversarial_loss is not None and party.adversary.last_reconstruction_loss is not None


def test_a_resumed_party_keeps_its_adversary_and_does_not_warm_up_again():
    images = _images(4, 0)
    party = EncoderParty(build_encoder(NETWORK, 0, seed=0), lr=5e-3, device=torch.device("cpu"),
                         adversary=_adversary(mean_image([images])), adversarial_weight=1.0)
    party.warm_up([images[:2], images[2:]])
    resumed = EncoderParty(build_encoder(NETWORK, 0, seed=0), lr=5e-3, device=torch.device("cpu"),
                           adversary=_adversary(torch.zeros_like(images[:1]), seed=1), adversarial_weight=1.0)
    resumed.load_state_dict(party.state_dict())
    assert resumed.warmed_up
    assert all(torch.equal(a, b) for a, b in zip(party.adversary.decoder.parameters(),
                                                 resumed.adversary.decoder.parameters()))
    assert torch.equal(resumed.adversary.atlas, party.adversary.atlas)


def test_warm_up_batches_are_seeded_passes_over_the_patients():
    batches = warmup_batches(["c", "a", "b"], batch_size=2, steps=4, seed=0)
    assert [len(b) for b in batches] == [2, 2, 2, 2]
    flat = sum(batches, [])
    assert sorted(flat[:3]) == ["a", "b", "c"] and sorted(flat[3:6]) == ["a", "b", "c"]
    assert batches == warmup_batches(["a", "b", "c"], batch_size=2, steps=4, seed=0)


@pytest.mark.parametrize("settings, message", [
    ({"privacy_warmup_steps": 3}, "needs a privacy term"),
    ({"adversarial_weight": 1.0, "patch_size": 16}, "whole-volume training"),
    ({"adversarial_weight": -1.0}, "must not be negative"),
])
def test_train_config_refuses_defences_it_cannot_run(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_site_warms_up_before_its_first_release_and_sends_what_an_undefended_site_sends(tiny_data, tmp_path):
    ids = ["BRATS_001", "BRATS_002"]
    plain, plain_ctx = init_site(tiny_data[1], tmp_path / "plain", TrainConfig(size=TINY_SIZE, network=TINY_NETWORK))
    config = TrainConfig(size=TINY_SIZE, network=TINY_NETWORK, adversarial_weight=1.0, privacy_warmup_steps=1)
    executor, fl_ctx = init_site(tiny_data[1], tmp_path / "defended", config)
    executor.snapshot_steps = [1]
    initial = copy.deepcopy(executor.party.encoder.state_dict())
    warm_ups = []
    warm_up = executor.party.warm_up
    executor.party.warm_up = lambda batches: warm_ups.append(1) or warm_up(batches)

    expected = send_task(plain, plain_ctx, TASK_TRAIN, 1, ids, info={"train_step": 1, "train_steps": 2})
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 1, ids, info={"train_step": 1, "train_steps": 2})
    sent, plain_sent = (TensorMessage.from_shareable(r, KIND_ACTIVATIONS, site="flair") for r in (reply, expected))
    assert {k: t.shape for k, t in sent.tensors.items()} == {k: t.shape for k, t in plain_sent.tensors.items()}
    assert set(sent.info) == set(plain_sent.info) and sent.patient_ids == plain_sent.patient_ids
    # The weights that computed the first release are the warmed-up ones, not the initial ones.
    released = torch.load(snapshot_path(tmp_path / "defended" / "job1", 1), weights_only=True)["encoder"]
    assert any(not torch.equal(released[k], initial[k]) for k in initial)
    assert warm_ups == [1] and executor.party.warmed_up

    gradients = {level: torch.zeros_like(t) for level, t in sent.tensors.items()}
    send_task(executor, fl_ctx, TASK_TRAIN, 2, ids, gradients, tensor_step=1, info={"train_step": 2})
    assert warm_ups == [1]  # once per run, before the first release only


def test_a_patch_trained_site_warms_up_on_patches_of_its_own_patients(tiny_data, tmp_path):
    """Patch training (the native job) warms up on uniform patches of the training patch's shape."""
    config = TrainConfig(size=TINY_SIZE, patch_size=8, augment=False, network=TINY_NETWORK, nopeek_weight=1.0,
                         privacy_warmup_steps=3)
    executor, fl_ctx = init_site(tiny_data[1], tmp_path / "patches", config)
    shapes = []
    warm_up = executor.party.warm_up
    executor.party.warm_up = lambda batches: warm_up(shapes.append(tuple(b.shape)) or b for b in batches)
    initial = copy.deepcopy(executor.party.encoder.state_dict())
    executor._warm_up(None, fl_ctx)
    assert shapes == [(config.batch_size, 1, 8, 8, 8)] * 3 and executor.party.warmed_up
    assert any(not torch.equal(executor.party.encoder.state_dict()[k], initial[k]) for k in initial)
