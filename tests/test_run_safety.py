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
    import modules.run.loop as loop  # where train_loop looks make_logger up

    logger = RecordingLogger()
    monkeypatch.setattr(loop, "make_logger", lambda *a, **k: logger)
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
    from modules.run import logs

    clock = iter([100.0, 100.0, 130.0, 130.0])
    monkeypatch.setattr(logs.time, "time", lambda: next(clock))
    line = logs.ProgressLine("dec", max_steps=100, batch_size=64, step=10, every=30.0, cap_minutes=2.0)
    assert not line.due() and line.due()  # 0 s, then 30 s after the last line
    # 10 steps in 30 s: 3 s a step, 64 / 3 examples/s; 90 steps left = 4.5 min, but the cap
    # (2 min, 1.5 min already spent) leaves 0.5 min.
    line.print(20, 1.23456, elapsed=90.0)
    err = capsys.readouterr().err
    assert err.strip() == "[dec] step 20/100 loss 1.2346 21 examples/s 1.5 min, ~0.5 min left"


# ---------------------------------------------------------------------------- damaged checkpoints, disk full
def _flip(path, offset=None):
    """Flip one byte in the middle of ``path`` (same size: only the checksum can tell)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _plain_loss(model):
    return lambda idx: ((model.w + 2) ** 2).sum()  # w -> -2: the metric -sum(w) rises


def test_checkpoint_checksum_names_the_file_and_the_problem(tmp_path):
    from modules.training import CheckpointError, checksum_path, load_checkpoint, save_checkpoint

    path = tmp_path / "last.pt"
    model = Linear()
    save_checkpoint(path, model=model, step=3)
    record = json.loads(checksum_path(path).read_text())
    assert checksum_path(path).name == "last.pt.sha256"
    assert record["file"] == "last.pt" and record["bytes"] == path.stat().st_size and len(record["sha256"]) == 64
    assert torch.load(path, weights_only=False)["step"] == 3  # still a plain torch.save file
    good = path.read_bytes()
    # A byte flipped inside the tensor data: torch.load would read it without complaint.
    w_offset = good.index(torch.ones(3).numpy().tobytes())
    _flip(path, w_offset)
    assert not torch.equal(torch.load(path, weights_only=False)["model"]["w"], torch.ones(3))
    with pytest.raises(CheckpointError, match=r"last\.pt: damaged checkpoint: checksum mismatch.*bytes changed"):
        load_checkpoint(path, model=model, fallback=False)
    path.write_bytes(good)
    _truncate(path)
    with pytest.raises(CheckpointError, match=rf"last\.pt: damaged checkpoint: truncated \({int(len(good) * 0.6):,} "
                                              rf"of the {len(good):,} bytes"):
        load_checkpoint(path, model=model, fallback=False)
    path.write_bytes(good + b"x")
    with pytest.raises(CheckpointError, match="longer than"):
        load_checkpoint(path, model=model, fallback=False)
    path.write_bytes(good)
    checksum_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"last\.pt\.sha256 is damaged"):
        load_checkpoint(path, model=model, fallback=False)
    # No checksum file (a checkpoint from before checksums): loaded when torch can read it.
    checksum_path(path).unlink()
    assert load_checkpoint(path, model=model, fallback=False)["step"] == 3
    _truncate(path)
    with pytest.raises(CheckpointError, match=r"last\.pt: damaged checkpoint: cannot be read \(no checksum file"):
        load_checkpoint(path, model=model, fallback=False)


def test_save_keeps_the_previous_checkpoint(tmp_path):
    from modules.training import atomic_torch_save, checksum_path, previous_path, save_checkpoint, verify_checkpoint

    path = tmp_path / "last.pt"
    for step in (1, 2, 3):
        save_checkpoint(path, model=Linear(), step=step)
    prev = previous_path(path)
    assert prev.name == "last.prev.pt" and checksum_path(prev).name == "last.prev.pt.sha256"
    assert verify_checkpoint(path) and verify_checkpoint(prev)
    assert torch.load(path, weights_only=False)["step"] == 3 and torch.load(prev, weights_only=False)["step"] == 2
    # best.pt: a checksum, no predecessor; nothing else is left in the folder (temp files).
    save_checkpoint(tmp_path / "best.pt", model=Linear(), step=1)
    atomic_torch_save({"step": 2}, tmp_path / "best.pt")
    assert verify_checkpoint(tmp_path / "best.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "best.pt.sha256", "last.prev.pt", "last.prev.pt.sha256", "last.pt", "last.pt.sha256"]


@pytest.mark.parametrize("damage", [_flip, _truncate, lambda p: p.unlink()])
def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, damage):
    """last.pt damaged (or lost between two renames): the run resumes from last.prev.pt with a
    warning naming the file and the problem, and ends exactly as an uninterrupted run."""
    from modules.training import CheckpointFallbackWarning

    full, (res_full, _) = run_loop(tmp_path / "full", _plain_loss)
    out = tmp_path / "run"
    run_loop(out, _plain_loss, stop_after_steps=30)  # saves at 10, 20, 30: last.pt step 30, last.prev.pt 20
    damage(out / "last.pt")
    problem = {_flip: "checksum mismatch", _truncate: "truncated"}.get(damage, "is missing")
    with pytest.warns(CheckpointFallbackWarning, match=rf"last\.pt.*{problem}(.|\n)*last\.prev\.pt \(step 20\)"):
        model, (res, _) = run_loop(out, _plain_loss)
    assert res.step == 100 and torch.equal(model.w, full.w) and res.best == res_full.best
    if damage is not _truncate and damage is not _flip:
        return
    assert (out / "last.pt.damaged").exists()  # set aside, not rotated over the good last.prev.pt
    assert torch.equal(torch.load(out / "best.pt", weights_only=False)["model"]["w"],
                       torch.load(tmp_path / "full" / "best.pt", weights_only=False)["model"]["w"])


def test_resume_never_starts_over_from_damaged_checkpoints(tmp_path):
    from modules.training import CheckpointError

    run_loop(tmp_path, _plain_loss, stop_after_steps=20)
    _truncate(tmp_path / "last.pt")
    _flip(tmp_path / "last.prev.pt")
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"both checkpoints are damaged:\n.*last\.pt: damaged checkpoint: "
                                              r"truncated.*\n.*last\.prev\.pt: damaged checkpoint: checksum mismatch"):
        run_loop(tmp_path, _plain_loss)
    assert (tmp_path / "last.pt").read_bytes() == before  # nothing trained, nothing written
    (tmp_path / "last.prev.pt").unlink()
    with pytest.raises(CheckpointError, match=r"last\.pt: damaged checkpoint: truncated.*\n.*no previous checkpoint"):
        run_loop(tmp_path, _plain_loss)


def test_damaged_best_checkpoint_is_named(tmp_path):
    from modules.training import CheckpointError

    run_loop(tmp_path, _plain_loss, stop_after_steps=10)
    _flip(tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt: damaged checkpoint: checksum mismatch"):
        load_best(Linear(), tmp_path)


def _fail_after(limit):
    """A writer wrapper raising ENOSPC once ``limit`` bytes went through (a full disk)."""
    import errno

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    return Full


@pytest.mark.parametrize("where", ["torch.save", "file write", "checksum file"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    import errno
    import os

    import modules.run.checkpoints as checkpoints
    import modules.training as training
    from modules.training import CheckpointWriteError, load_checkpoint, verify_checkpoint

    run_loop(tmp_path, _plain_loss, stop_after_steps=20)  # last.pt at step 20, last.prev.pt at 10
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".png"}
    if where == "torch.save":  # half the checkpoint written, then the disk is full
        real_save = torch.save

        def save(obj, f):
            import io
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(torch, "save", save)
    else:  # the real torch.save on a file that fails part way (the checkpoint, or its checksum)
        real_fdopen = os.fdopen

        def fdopen(fd, mode="r", *a, **k):
            f = real_fdopen(fd, mode, *a, **k)
            return _fail_after(500 if where == "file write" else 10)(f) if ("b" in mode) == (where == "file write") \
                else f
        monkeypatch.setattr(checkpoints.os, "fdopen", fdopen)
    # (the next save, at step 30, writes best.pt first: the metric still improves)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*best\.pt: disk full \(No space "
                                                   r"left on device\).*best\.pt is unchanged") as info:
        run_loop(tmp_path, _plain_loss)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*last\.pt: disk full.*last\.pt is "
                                                   r"unchanged \(the previous checkpoint\)"):
        training.save_checkpoint(tmp_path / "last.pt", model=Linear(), step=30)  # the rotating save
    monkeypatch.undo()
    # Nothing replaced, no temp file left behind; the previous checkpoint loads, checksum and all.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".png"} == files
    assert verify_checkpoint(tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt", model=Linear(), fallback=False)["step"] == 20
