"""The learning-rate schedule (modules/run/batching.py WarmupCosine): the step-sized cosine
against a naive reference, the budget-sized one ('first') with a known answer, its state kept
across a resume, and train_loop ending the decay at the time cap under a fake clock."""

import math

import pytest
import torch

import modules.run.loop as loop
from modules.training import make_optimizer, train_loop, warmup_cosine


def naive_factor(step, warmup, total, min_ratio):
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))  # no decay span: straight to the floor
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * p)) / 2


def lrs(sched, opt, steps, fractions=None):
    out = [opt.param_groups[0]["lr"]]
    for s in range(steps):
        opt.step()
        if fractions is not None:
            sched.budget_fraction = fractions[s]
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def new_opt(lr=0.5):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize("warmup,total,min_ratio", [(1, 10, 0.0), (5, 40, 0.1), (3, 3, 0.0)])
def test_step_cosine_matches_the_naive_formula(warmup, total, min_ratio):
    opt = new_opt()
    got = lrs(warmup_cosine(opt, warmup, total, min_ratio), opt, total + 3)
    want = [0.5 * naive_factor(s, warmup, total, min_ratio) for s in range(total + 4)]
    assert got == pytest.approx(want, abs=1e-12)


def test_step_cosine_ignores_the_budget():
    opt_a, opt_b = new_opt(), new_opt()
    a = lrs(warmup_cosine(opt_a, 2, 20), opt_a, 20)
    b = lrs(warmup_cosine(opt_b, 2, 20), opt_b, 20, fractions=[0.9] * 20)
    assert a == b


def test_budget_cosine_known_answer():
    # Warm-up 2 steps, 100 steps planned, but the clock says the budget runs out first: 10% of it
    # per step, the warm-up having ended at 20%: the decay's progress is (f - 0.2) / 0.8.
    opt = new_opt(1.0)
    sched = warmup_cosine(opt, 2, 100, 0.0, ends_at="first")
    fractions = [0.1 * (s + 1) for s in range(12)]
    got = lrs(sched, opt, 12, fractions)
    assert got[:2] == [0.5, 1.0]  # warm-up: the budget plays no part
    assert sched.warm_fraction == pytest.approx(0.2)
    for step in range(2, 13):
        f = fractions[step - 1]
        p = max((step - 2) / 98, min(1.0, (f - 0.2) / 0.8))
        assert got[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * p)), abs=1e-12)
    assert got[10] == pytest.approx(0.0, abs=1e-12)  # f = 1.0 at step 10: the cosine has ended
    # ... and the steps win when they end first (a fast machine): progress is their share.
    opt2 = new_opt(1.0)
    fast = lrs(warmup_cosine(opt2, 2, 12, 0.0, ends_at="first"), opt2, 12, [0.01 * (s + 1) for s in range(12)])
    assert fast[12] == pytest.approx(0.0, abs=1e-12) and fast[7] == pytest.approx(0.5, abs=1e-12)


def test_budget_state_survives_a_resume():
    opt = new_opt(1.0)
    sched = warmup_cosine(opt, 2, 100, 0.0, ends_at="first")
    lrs(sched, opt, 5, [0.1, 0.2, 0.3, 0.4, 0.5])
    opt2 = new_opt(1.0)
    resumed = warmup_cosine(opt2, 2, 100, 0.0, ends_at="first")
    resumed.load_state_dict(sched.state_dict())
    assert (resumed.warm_fraction, resumed.budget_fraction, resumed.last_epoch) == (
        sched.warm_fraction, sched.budget_fraction, sched.last_epoch)
    assert lrs(resumed, opt2, 3, [0.6, 0.7, 0.8])[1:] == lrs(sched, opt, 3, [0.6, 0.7, 0.8])[1:]


def test_bad_ends_at_is_refused():
    with pytest.raises(ValueError, match="ends_at"):
        warmup_cosine(new_opt(), 1, 10, ends_at="time")


def test_train_loop_ends_the_decay_at_the_time_cap(tmp_path, monkeypatch):
    # A fake training clock: one second per reading. A 1-minute cap then stops the run after a
    # few dozen of its 10,000 planned steps, and the budget-sized cosine has reached its floor.
    ticks = {"t": 0.0}

    def fake_clock(kind="wall"):
        def read():
            ticks["t"] += 1.0
            return ticks["t"]
        return read

    monkeypatch.setattr(loop, "training_clock", fake_clock)
    model = torch.nn.Linear(2, 1)
    opt = make_optimizer(model, 0.1, 0.0)
    seen = []

    def loss_fn(idx):
        seen.append(opt.param_groups[0]["lr"])
        return model(torch.ones(len(idx), 2)).pow(2).mean()

    sched = warmup_cosine(opt, 2, 10_000, 0.1, ends_at="first")
    result, logger = train_loop(model=model, optimizer=opt, scheduler=sched, num_examples=40, batch_size=4,
                                loss_fn=loss_fn, validate=lambda: {"ndcg@10": 0.0}, out_dir=tmp_path,
                                max_steps=10_000, eval_every=1_000, seed=0, log_every=1_000,
                                max_train_minutes=1.0)
    logger.finish()
    assert 10 < result.step < 100  # stopped by the cap, far before the planned steps
    assert sched.budget_fraction >= 1.0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1)  # the floor, min_ratio x base
    assert seen[len(seen) // 2] < 0.1 * 0.9  # decaying on the way, not only at the end
