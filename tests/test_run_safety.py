"""A run never resumes or tests another run's checkpoint, a non-finite loss stops training
before anything is saved from it, and precision "auto" follows a measurement, not a CPU flag."""

import json

import pytest
import torch

import train_decoder
import train_rqvae
from modules.training import (
    NonFiniteLossError, ResumeMismatchError, StepOutput, autocast_dtype, config_bindings, load_best, make_optimizer, train_loop,
    warmup_cosine,
)
from tests.fixtures import dataset_bindings, run_script, write_p5_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    data = write_p5_dataset(root / "data")
    base = dataset_bindings(data, root / "cache")
    return root, base


def rqvae(setup, out, *extra):
    root, base = setup
    return run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin", base + [f"train_rqvae.out_dir = '{out}'", *extra])


def decoder(setup, out, tokenizer, *extra):
    root, base = setup
    return run_script(train_decoder.main, "configs/tiny/decoder_tiny.gin", base + [
        f"train_decoder.tokenizer = '{tokenizer}'", f"train_decoder.out_dir = '{out}'",
        "train_decoder.precision = 'fp32'", *extra])


def test_config_bindings_parses_gin_text():
    text = ("# Macros:\n# ===\nSEED = 42\n\n# Parameters for f:\n# ===\nf.a = %SEED\nf.b = {'x': 1}\n"
            "f.c = \\\n    [0,\n     1,\n     2]\n")
    assert config_bindings(text) == {"SEED": "42", "f.a": "%SEED", "f.b": "{'x': 1}", "f.c": "[0, 1, 2]"}


def test_decoder_refuses_changed_config_and_retrained_tokenizer(setup, tmp_path):
    rq = tmp_path / "rq"
    rqvae(setup, rq)
    out = tmp_path / "dec"
    assert decoder(setup, out, rq, "train_decoder.stop_after_steps = 20")["stopped_at_step"] == 20
    # A changed learning rate would be overwritten by the restored scheduler: refuse, naming it.
    with pytest.raises(ResumeMismatchError, match=r"train_decoder\.lr: 0\.003 -> 0\.01"):
        decoder(setup, out, rq, "train_decoder.lr = 0.01")
    # The tokenizer retrained under the same path (another seed): other item codes, same bindings.
    rqvae(setup, rq, "train_rqvae.seed = 7", "train_rqvae.resume = False")
    with pytest.raises(ResumeMismatchError, match="item_codes"):
        decoder(setup, out, rq)
    # resume = False starts over in the folder (and removes the old best.pt first).
    res = decoder(setup, out, rq, "train_decoder.resume = False")
    assert res["steps"] == 60 and "test" in res


def test_decoder_resume_allows_run_control_changes(setup, tmp_path):
    rq = tmp_path / "rq"
    rqvae(setup, rq)
    out = tmp_path / "dec"
    decoder(setup, out, rq, "train_decoder.stop_after_steps = 20")
    # time cap, cadence and logging may change on resume; the run goes on to its end.
    res = decoder(setup, out, rq, "train_decoder.max_train_minutes = 30.0", "train_decoder.log_every = 5")
    assert res["steps"] == 60


def test_finished_run_is_not_trained_further(setup, tmp_path):
    rq = tmp_path / "rq"
    rqvae(setup, rq)
    out = tmp_path / "dec"
    first = decoder(setup, out, rq, "train_decoder.patience = 1", "train_decoder.eval_every = 10",
                    "train_decoder.lr = 0.0")  # lr 0: validation never improves, patience stops it at 20
    assert first["steps"] == 20
    again = decoder(setup, out, rq, "train_decoder.patience = 1", "train_decoder.eval_every = 10",
                    "train_decoder.lr = 0.0")
    assert again["steps"] == 20 and again["test"] == first["test"]


def test_rqvae_rerun_with_another_seed_is_refused(setup, tmp_path):
    rq = tmp_path / "rq"
    first = rqvae(setup, rq)
    with pytest.raises(ResumeMismatchError, match=r"train_rqvae\.seed: %SEED -> 7"):
        rqvae(setup, rq, "train_rqvae.seed = 7")
    other = rqvae(setup, rq, "train_rqvae.seed = 7", "train_rqvae.resume = False")
    assert other["steps"] == first["steps"] and other["codebook_usage"] != first["codebook_usage"]


# ---------------------------------------------------------------------------- the shared loop
class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))


def run_loop(out, loss_fn, **kw):
    torch.manual_seed(0)
    model = Linear()
    opt = make_optimizer(model, 0.1, 0.0)
    args = dict(model=model, optimizer=opt, scheduler=warmup_cosine(opt, 1, 100), num_examples=50, batch_size=5,
                loss_fn=loss_fn(model), validate=lambda: {"ndcg@10": float(-model.w.detach().sum())}, out_dir=out,
                max_steps=100, eval_every=10, seed=0, log_every=1000)
    args.update(kw)
    return model, train_loop(**args)


def test_nan_loss_stops_before_saving_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(model):
        def f(idx):
            calls["n"] += 1
            loss = (model.w ** 2).sum()
            return loss * float("nan") if calls["n"] == 25 else loss
        return f

    with pytest.raises(NonFiniteLossError, match=r"NaN or inf between steps 20 and 30.*last\.pt \(step 20\)"):
        run_loop(tmp_path, loss_fn)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["step"] == 20 and torch.isfinite(state["model"]["w"]).all()
    assert torch.isfinite(torch.load(tmp_path / "best.pt", weights_only=False)["model"]["w"]).all()


class RecordingLogger:
    def __init__(self):
        self.rows = []

    def log(self, metrics, step=None):
        self.rows.append((step, metrics))

    def log_image(self, *a, **k):
        pass


def test_step_statistics_are_logged_as_window_means_and_before_step_sees_every_step(tmp_path, monkeypatch):
    """A loss_fn's StepOutput metrics reach the logger as the mean over each log window, and
    before_step is called with the global step, also after a resume."""
    import modules.training as training

    logger = RecordingLogger()
    monkeypatch.setattr(training, "make_logger", lambda *a, **k: logger)
    seen = []

    def loss_fn(model):
        def f(idx):
            step = seen[-1][0]
            return StepOutput((model.w ** 2).sum(), {"value": float(step)})
        return f

    run_loop(tmp_path, loss_fn, log_every=4, stop_after_steps=12, before_step=lambda s, e: seen.append((s, e)))
    assert [s for s, _ in seen] == list(range(12)) and [e for _, e in seen] == [0] * 10 + [1] * 2
    train_rows = [(step, m) for step, m in logger.rows if "train/loss" in m]
    assert [(step, m["train/value"]) for step, m in train_rows] == [(4, 1.5), (8, 5.5), (12, 9.5)]
    run_loop(tmp_path, loss_fn, log_every=4, stop_after_steps=4, before_step=lambda s, e: seen.append((s, e)))
    assert [s for s, _ in seen[12:]] == [12, 13, 14, 15]


def test_time_cap_counts_the_chosen_clock(tmp_path, monkeypatch):
    """max_train_minutes counts training_clock: with 'process', 40 CPU seconds a step pass a
    1-minute cap after 2 steps whatever the wall clock says; with 'wall' the same run goes on."""
    import gin

    fake = {"t": 0.0}

    def cpu_clock():
        return fake["t"]

    def loss_fn(model):
        def f(idx):
            fake["t"] += 40.0  # each step "uses" 40 CPU seconds
            return (model.w ** 2).sum()
        return f

    monkeypatch.setattr("time.process_time", cpu_clock)
    with gin.unlock_config():
        gin.bind_parameter("training_clock.kind", "process")
    try:
        _, (res, _) = run_loop(tmp_path / "cpu", loss_fn, max_train_minutes=1)
    finally:
        gin.clear_config()
    assert res.step == 2 and res.train_seconds >= 60
    _, (res, _) = run_loop(tmp_path / "wall", loss_fn, max_train_minutes=1)
    assert res.step == 100


def test_load_best_never_falls_back_silently(tmp_path):
    with pytest.raises(FileNotFoundError, match="best.pt"):
        load_best(Linear(), tmp_path)


def test_fresh_start_removes_a_stale_best_checkpoint(tmp_path):
    torch.save({"model": {"w": torch.zeros(3)}, "step": 1, "config": "", "identity": {}}, tmp_path / "best.pt")

    def loss_fn(model):
        return lambda idx: (model.w ** 2).sum() * float("nan")  # never validates to a best

    with pytest.raises(NonFiniteLossError):
        run_loop(tmp_path, loss_fn)
    assert not (tmp_path / "best.pt").exists()


def test_identity_mismatch_in_the_shared_loop(tmp_path):
    def loss_fn(model):
        return lambda idx: (model.w ** 2).sum()

    run_loop(tmp_path, loss_fn, identity={"dataset": "aaaa"}, stop_after_steps=10)
    with pytest.raises(ResumeMismatchError, match="dataset \\(input\\): aaaa -> bbbb"):
        run_loop(tmp_path, loss_fn, identity={"dataset": "bbbb"})
    _, (res, logger) = run_loop(tmp_path, loss_fn, identity={"dataset": "aaaa"})
    assert res.step == 100 and res.finished


# ---------------------------------------------------------------------------- precision
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDREC_CACHE", str(tmp_path))
    return tmp_path


def slow_when(slow_dtype, seconds=0.02):
    calls = []

    def benchmark(dtype):
        calls.append(dtype)
        torch.rand(3)  # draws from the global RNG, which calibration must restore
        if dtype == slow_dtype:
            import time
            time.sleep(seconds)
    return benchmark, calls


@pytest.mark.parametrize("slow, expected", [(torch.bfloat16, None), (None, torch.bfloat16)])
def test_auto_precision_follows_the_measurement_and_is_cached(cache, slow, expected):
    benchmark, calls = slow_when(slow)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert autocast_dtype(torch.device("cpu"), "auto", benchmark, "k") is expected
    assert torch.equal(torch.get_rng_state(), before)  # seeded runs do not depend on the cache
    assert len(calls) == 8  # 2 warm-ups + 3 timed rounds of both
    saved = json.loads((cache / "precision.json").read_text())
    (entry,) = saved.values()
    assert entry["precision"] == ("bf16" if expected else "fp32")
    assert autocast_dtype(torch.device("cpu"), "auto", benchmark, "k") is expected
    assert len(calls) == 8  # the second run read the cache


def test_auto_precision_without_measurement(cache):
    benchmark, calls = slow_when(None)
    assert autocast_dtype(torch.device("cpu"), "auto") is None  # no measurement: fp32 on a CPU
    assert autocast_dtype(torch.device("cuda"), "auto", benchmark) is torch.bfloat16 and not calls
    assert autocast_dtype(torch.device("cpu"), "fp32", benchmark) is None and not calls
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype(torch.device("cpu"), "fp16")


def test_progress_line_known_answer(capsys, monkeypatch):
    from modules import training

    clock = iter([100.0, 100.0, 130.0, 130.0])
    monkeypatch.setattr(training.time, "time", lambda: next(clock))
    line = training.ProgressLine("dec", max_steps=100, batch_size=64, step=10, every=30.0, cap_minutes=2.0)
    assert not line.due() and line.due()  # 0 s, then 30 s after the last line
    # 10 steps in 30 s: 3 s a step, 64 / 3 examples/s; 90 steps left = 4.5 min, but the cap
    # (2 min, 1.5 min already spent) leaves 0.5 min.
    line.print(20, 1.23456, elapsed=90.0)
    err = capsys.readouterr().err
    assert err.strip() == "[dec] step 20/100 loss 1.2346 21 examples/s 1.5 min, ~0.5 min left"
