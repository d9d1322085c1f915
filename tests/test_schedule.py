"""The training schedule both centralized and split training follow: batches, drops, validation points and the
resume position, as plain code."""

import pytest

from split_unet.training import TrainConfig, dropped_input, epoch_batches
from split_unet.training.schedule import Schedule, learning_rate

pytestmark = pytest.mark.unit
PATIENTS = [f"P{i:02d}" for i in range(7)]


def config(**fields) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 2, "val_interval": 2, "seed": 5, **fields})


def test_steps_cover_every_epoch_batch_in_order_and_count_from_one():
    schedule = Schedule(PATIENTS, config(), num_inputs=4)
    steps = [step for epoch in range(3) for step in schedule.steps(epoch)]
    assert schedule.total_steps == len(steps) == 3 * 4  # 7 patients in batches of 2: 4 per epoch
    assert [step.train_step for step in steps] == list(range(1, 13))
    for epoch in range(3):
        assert [s.patient_ids for s in steps if s.epoch == epoch] == epoch_batches(PATIENTS, 2, 5, epoch)
    assert schedule.steps_before(2) == 8


def test_dropout_draw_is_that_of_the_step_number():
    schedule = Schedule(PATIENTS, config(modality_dropout=0.5), num_inputs=4)
    steps = [step for epoch in range(3) for step in schedule.steps(epoch)]
    assert [s.absent for s in steps] == [dropped_input(0.5, 4, 5, n) for n in range(1, 13)]
    assert any(s.absent is not None for s in steps) and any(s.absent is None for s in steps)


def test_resume_skips_the_steps_done_and_continues_with_the_same_draws():
    schedule = Schedule(PATIENTS, config(modality_dropout=0.5), num_inputs=4)
    whole = list(schedule.steps(1))
    resumed = list(schedule.steps(1, done=6))  # a checkpoint after step 6, the 2nd of epoch 1
    assert resumed == whole[2:] and resumed[0].train_step == 7 and resumed[0].index == 2


def test_validation_every_interval_and_after_the_last_epoch():
    assert [Schedule(PATIENTS, config(), 4).validates_after(e) for e in range(3)] == [False, True, True]
    assert [Schedule(PATIENTS, config(val_interval=5), 4).validates_after(e) for e in range(3)] == [False, False, True]


def test_progress_points_about_every_quarter_but_not_at_the_epoch_end():
    schedule = Schedule([f"P{i}" for i in range(16)], config(batch_size=1, epochs=1), 4)
    assert [s.index for s in schedule.steps(0) if s.progress_point] == [3, 7, 11]


def test_epochs_of_steps_continue_through_shuffled_passes():
    # 7 patients in batches of 2: passes of 4 batches; epochs of 3 steps cut across them.
    schedule = Schedule(PATIENTS, config(steps_per_epoch=3), num_inputs=4)
    assert schedule.total_steps == 9 and [len(batches) for batches in schedule.batches] == [3, 3, 3]
    stream = [batch for p in range(3) for batch in epoch_batches(PATIENTS, 2, 5, p)]
    assert [batch for batches in schedule.batches for batch in batches] == stream[:9]
    resumed = list(schedule.steps(1, done=4))
    assert [s.train_step for s in resumed] == [5, 6] and resumed[0].patient_ids == stream[4]


def test_poly_learning_rate_decays_from_lr_to_near_zero_by_the_step_number():
    poly = config(lr=0.01, steps_per_epoch=5, epochs=2, lr_schedule="poly")
    rates = [learning_rate(poly, step) for step in range(1, 11)]
    assert rates[0] == 0.01 and all(a > b > 0 for a, b in zip(rates, rates[1:]))
    assert rates[5] == pytest.approx(0.01 * 0.5 ** 0.9)  # step 6: half the run done, nnU-Net's exponent
    assert learning_rate(config(lr=0.01), 7) == 0.01  # constant
    with pytest.raises(ValueError, match="needs steps_per_epoch"):
        config(lr_schedule="poly")
