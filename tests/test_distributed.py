"""Data-parallel training (modules/distributed.py) on 2 CPU processes, gloo on 127.0.0.1, spawned
by the tests themselves with the environment torchrun would give them: one DDP step equals one
single-process step on the same global batch (decoder losses, sliding window and all positions,
whose shards hold different label counts), sharded evaluation equals single-process evaluation
exactly, and end to end (train_rqvae.py then train_decoder.py): identical item codes on both
ranks, exact resume under DDP, and nothing written or printed by rank 1."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from modules import distributed

WORLD = 2
N_TRAIN = 9  # one global batch of 9: shards of 5 and 4 examples


# ----------------------------------------------------------------------------- spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    # What torchrun sets for each process it starts.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.init("cpu") == torch.device("cpu") and distributed.world_size() == world
    try:
        fn(*args)
    finally:
        distributed.shutdown()


def run_ranks(fn, *args, world: int = WORLD) -> None:
    """``fn(*args)`` in ``world`` fresh processes joined in one gloo group; a failure in any
    raises here with its traceback. A deadlock fails after 10 minutes instead of hanging."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 600
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not finish in 10 minutes: a collective that not every rank reached?")


# ----------------------------------------------------------------------------- a tiny decoder setup
def _setup(mode: str):
    """A tiny T5 (sliding windows) or GPT (all positions) without dropout, 30 items with 2-level
    codes, and N_TRAIN training rows whose label counts differ (histories / segments of several
    lengths). Built the same way in every process (fixed seed)."""
    from modules.tokens import TokenLayout
    from modules.transformers.gpt import GPT, GPTConfig
    from modules.transformers.t5 import T5, T5Config

    layout = TokenLayout((6, 5), num_user_buckets=4)
    codes = torch.stack([torch.arange(30) // 5, torch.arange(30) % 5], 1)
    rng = np.random.default_rng(0)
    lengths = [1, 5, 2, 4, 3, 5, 1, 2, 4]  # items per row
    width = 6
    items = np.full((N_TRAIN, width), -1, dtype=np.int64)
    for r, n in enumerate(lengths):
        items[r, : n + 1] = rng.choice(30, n + 1, replace=False)  # history n items (+ the target)
    user = rng.integers(0, 1000, N_TRAIN)
    torch.manual_seed(0)
    sizes = dict(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size, d_model=16, num_heads=2,
                 d_head=8, d_ff=32, dropout=0.0)
    if mode == "sliding":
        model = T5(T5Config(**sizes, num_encoder_layers=1, num_decoder_layers=1))
    else:
        model = GPT(GPTConfig(**sizes, num_layers=1))
    return model, layout, codes, items, user, np.array(lengths)


def _loss_fn(mode: str, model, layout, codes, items, user, lengths):
    from modules.objectives import all_positions_loss, sliding_window_loss
    from modules.training import SummedLoss

    def loss_fn(idx):
        u = torch.as_tensor(user[idx])
        if mode == "sliding":  # history = the row's items before its last, target = its last
            hist = items[idx].copy()
            target = hist[np.arange(len(idx)), lengths[idx]]
            hist[np.arange(len(idx)), lengths[idx]] = -1
            return SummedLoss(*sliding_window_loss(model, layout, codes, torch.as_tensor(hist),
                                                   torch.as_tensor(target), u, chunk=2))
        return SummedLoss(*all_positions_loss(model, layout, codes, torch.as_tensor(items[idx]), u, chunk=2))
    return loss_fn


def _train(mode: str, out: Path, optimizer: str, batch_size: int, max_steps: int):
    """train_loop (the code path a script takes) with plain SGD (lr 1: the update is the gradient,
    so a wrong normalisation shows) or AdamW with gradient clipping; returns the final weights."""
    from modules.training import make_optimizer, train_loop

    model, layout, codes, items, user, lengths = _setup(mode)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
    else:
        opt = make_optimizer(model, 0.01, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_loop(model=model, optimizer=opt, scheduler=scheduler, num_examples=N_TRAIN, batch_size=batch_size,
               loss_fn=_loss_fn(mode, model, layout, codes, items, user, lengths),
               validate=lambda: {"ndcg@10": 0.0}, out_dir=out, max_steps=max_steps, eval_every=max_steps, seed=0,
               grad_clip=None if optimizer == "sgd" else 0.5, log_every=1, resume=False)
    return model.state_dict()


def _evaluate(mode: str):
    """evaluate_generative (constrained and not) of the tiny model on 23 users in batches of 4
    (6 batches: 3 per rank, the last one short), and evaluate_exact_topk of a scoring model."""
    from data.dataset import Examples
    from modules.beam_search import PrefixTrie
    from modules.evaluation import evaluate_exact_topk, evaluate_generative

    model, layout, codes, *_ = _setup(mode)
    trie = PrefixTrie(codes, layout.codebook_sizes)
    rng = np.random.default_rng(1)
    n = 23
    history = np.where(rng.random((n, 5)) < 0.8, rng.integers(0, 30, (n, 5)), -1)
    history[:, 0] = rng.integers(0, 30, n)
    history = np.sort(history, axis=1)[:, ::-1].copy()  # -1 padding at the end
    examples = Examples(rng.integers(0, 1000, n), history, rng.integers(0, 30, n))
    out = {}
    for unconstrained in (False, True):
        out[unconstrained] = evaluate_generative(model, examples, codes, layout, trie, beam_size=10, batch_size=4,
                                                 use_user=True, unconstrained=unconstrained)

    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(30, 8)

        def scores(self, hist):
            h = self.table(hist.clamp(min=0)) * (hist >= 0)[..., None]
            return h.sum(1) @ self.table.weight.T

    torch.manual_seed(3)
    out["exact"] = evaluate_exact_topk(Scorer(), examples, batch_size=4)
    for m in out.values():
        m.pop("users_per_second")
    return out


def _evaluate_actionpiece():
    """evaluate_actionpiece of a tiny random T5 over a 2-category vocabulary (12 items, one merge
    rule), 11 users x 2 SPR segmentations in batches of 2 users (6 batches: 3 per rank)."""
    from data.dataset import Examples
    from modules.actionpiece import ActionPieceTokenizer
    from modules.actionpiece.recommender import ActionPieceLayout, ItemDecoder, evaluate_actionpiece
    from modules.transformers.t5 import T5, T5Config

    items = [(a, b) for a in range(4) for b in range(4) if a != b]
    t2f = [(-1, -1)] + [(0, v) for v in range(4)] + [(1, v) for v in range(4)] + [(-1, 1, 6)]
    tok = ActionPieceTokenizer(2, 9, t2f, [0.0] * 9 + [5.0], np.array(items))
    layout = ActionPieceLayout.build(tok, "all")
    torch.manual_seed(5)
    model = T5(T5Config(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size, d_model=16,
                        num_heads=2, d_head=8, d_ff=32, num_encoder_layers=1, num_decoder_layers=1, dropout=0.0))
    rng = np.random.default_rng(2)
    n = 11
    history = np.full((n, 4), -1, dtype=np.int64)
    for u in range(n):
        k = int(rng.integers(1, 5))
        history[u, :k] = rng.choice(len(items), k, replace=False)
    examples = Examples(np.arange(n), history, rng.integers(0, len(items), n))
    out = evaluate_actionpiece(model, tok, layout, ItemDecoder(tok, layout), examples, q=2, num_beams=4,
                               batch_size=4, seed=0, device=torch.device("cpu"))
    out.pop("users_per_second")
    return out


def _worker_steps(out: str) -> None:
    out, r = Path(out), distributed.rank()
    with pytest.raises(ValueError, match="last batch"):  # 9 examples in batches of 4: a last batch of 1
        distributed.check_batches(9, 4)
    with pytest.raises(ValueError, match="smaller than the 2 processes"):
        distributed.check_batches(9, 1)
    result = {}
    for mode in ("sliding", "all_positions"):
        result[mode, "sgd"] = _train(mode, out / f"{mode}_sgd", "sgd", N_TRAIN, 1)
        result[mode, "adamw"] = _train(mode, out / f"{mode}_adamw", "adamw", 3, 3)
        result[mode, "eval"] = _evaluate(mode)
    result["actionpiece"] = _evaluate_actionpiece()
    with open(out / f"rank{r}.pkl", "wb") as f:
        pickle.dump(result, f)


@pytest.fixture(scope="module")
def ddp_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_steps")
    run_ranks(_worker_steps, str(out))
    return out, [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


def _naive_sgd_step(mode: str) -> dict:
    """What averaging the two ranks' *mean* losses would give (the bug normalising per rank is)."""
    model, layout, codes, items, user, lengths = _setup(mode)
    loss_fn = _loss_fn(mode, model, layout, codes, items, user, lengths)
    order = np.random.default_rng([0, 0]).permutation(N_TRAIN)  # epoch 0's order (training.epoch_order)
    loss = sum(loss_fn(part).mean() for part in np.array_split(order, WORLD)) / WORLD
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad
    return model.state_dict()


@pytest.mark.parametrize("mode", ["sliding", "all_positions"])
def test_one_ddp_step_equals_one_process_step(ddp_steps, tmp_path, mode):
    out, ranks = ddp_steps
    for optimizer, batch, steps in (("sgd", N_TRAIN, 1), ("adamw", 3, 3)):
        single = _train(mode, tmp_path / optimizer, optimizer, batch, steps)
        for r, got in enumerate(ranks):
            for k in single:
                assert torch.equal(got[mode, optimizer][k], ranks[0][mode, optimizer][k]), (r, k)  # ranks agree
                torch.testing.assert_close(got[mode, optimizer][k], single[k], atol=2e-6, rtol=1e-5,
                                           msg=f"{optimizer} {k}")
    # The test can fail: per-rank means averaged (shards of 5 and 4 rows with different label
    # counts) give another step than the single process, by far more than the tolerance.
    naive, single = _naive_sgd_step(mode), _train(mode, tmp_path / "again", "sgd", N_TRAIN, 1)
    assert max(float((naive[k] - single[k]).abs().max()) for k in single) > 1e-3


@pytest.mark.parametrize("mode", ["sliding", "all_positions"])
def test_sharded_evaluation_equals_one_process_exactly(ddp_steps, mode):
    _, ranks = ddp_steps
    single = _evaluate(mode)
    assert single[True]["users"] == 23 and 0 <= single[True]["invalid_rate"] <= 1
    for got in ranks:
        assert got[mode, "eval"] == single  # every figure, to the last bit, on every rank


def test_sharded_actionpiece_evaluation_equals_one_process_exactly(ddp_steps):
    _, ranks = ddp_steps
    single = _evaluate_actionpiece()
    assert single["users"] == 11 and 0 <= single["invalid_rate"] <= 1
    for got in ranks:
        assert got["actionpiece"] == single


def test_ddp_checkpoints_come_from_rank_0_with_every_rank_rng(ddp_steps):
    out, _ = ddp_steps
    state = torch.load(out / "sliding_sgd" / "last.pt", weights_only=False)
    assert len(state["rng_per_rank"]) == WORLD and state["step"] == 1
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])  # own streams
    assert (out / "sliding_sgd" / "best.pt").exists() and (out / "sliding_sgd" / "training_curves.png").exists()


# ----------------------------------------------------------------------------- end to end
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _write_recorder(writes: list, watched: list[Path]):
    """An audit hook recording every file this process creates, opens for writing, renames or
    removes under ``watched``."""
    roots = [str(w) for w in watched]

    def under(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(os.fspath(path)).startswith(tuple(roots))

    def hook(event, args):
        if event == "open" and under(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (not mode and flags & _WRITE_FLAGS):
                writes.append((event, os.fsdecode(os.fspath(args[0]))))
        elif event in ("os.rename", "os.remove", "os.rmdir", "tempfile.mkstemp", "tempfile.mkdtemp",
                       "shutil.rmtree", "shutil.move", "shutil.copyfile") and args and under(args[0]):
            writes.append((event, os.fsdecode(os.fspath(args[0]))))
    return hook


def _worker_scripts(root: str) -> None:
    import train_decoder
    import train_rqvae
    from tests.fixtures import dataset_bindings, run_script

    root, r = Path(root), distributed.rank()
    os.environ["SIDREC_CACHE"] = str(root / "sidrec_cache")  # the precision measurement's cache
    writes: list = []
    if r != 0:
        sys.addaudithook(_write_recorder(writes, [root / "runs", root / "cache", root / "sidrec_cache"]))
    codes = []  # every rank's item codes at each RQ-VAE evaluation and at the end
    metrics = train_rqvae.tokenizer_metrics

    def spy(*a, **k):
        m = metrics(*a, **k)
        codes.append(m["codes"].cpu())
        return m

    train_rqvae.tokenizer_metrics = spy
    base = dataset_bindings(root / "data", root / "cache")
    rq = root / "runs" / "rq"

    def decoder(out, *extra):
        return run_script(train_decoder.main, "configs/tiny/decoder_tiny.gin", base + [
            f"train_decoder.tokenizer = '{rq}'", f"train_decoder.out_dir = '{root / 'runs' / out}'",
            "train_decoder.max_steps = 20", "train_decoder.eval_every = 10", "train_decoder.device = 'cpu'", *extra])

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results = [run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin",
                              base + [f"train_rqvae.out_dir = '{rq}'", "train_rqvae.max_steps = 100",
                                      "train_rqvae.device = 'cpu'"]),
                   decoder("full"), decoder("split", "train_decoder.stop_after_steps = 10"), decoder("split")]
    report = root / "report"
    report.mkdir(exist_ok=True)
    torch.save({"codes": codes, "writes": writes, "stdout": stdout.getvalue(), "results": results},
               report / f"rank{r}.pt")


@pytest.fixture(scope="module")
def ddp_scripts(tmp_path_factory):
    from tests.fixtures import write_p5_dataset

    root = tmp_path_factory.mktemp("ddp_scripts")
    write_p5_dataset(root / "data")
    run_ranks(_worker_scripts, str(root))
    return root, [torch.load(root / "report" / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_rqvae_item_codes_identical_across_ranks(ddp_scripts):
    root, (r0, r1) = ddp_scripts
    assert len(r0["codes"]) == len(r1["codes"]) >= 2  # 2 periodic evaluations + the final codes
    for a, b in zip(r0["codes"], r1["codes"]):
        assert torch.equal(a, b)
    tok = r0["results"][0]
    assert tok["steps"] == 100 and tok["unique_after_dedup"] and 0 <= tok["collision_rate"] < 1
    saved = torch.load(root / "runs" / "rq" / "last.pt", weights_only=False)
    assert len(saved["rng_per_rank"]) == WORLD


def test_ddp_resume_reproduces_the_uninterrupted_run(ddp_scripts):
    root, (r0, _) = ddp_scripts
    _, full, part, resumed = r0["results"]
    assert part["stopped_at_step"] == 10 and full["steps"] == resumed["steps"] == 20
    assert resumed["valid"] == full["valid"] and resumed["test"] == full["test"]
    a = torch.load(root / "runs" / "full" / "best.pt", weights_only=False)["model"]
    b = torch.load(root / "runs" / "split" / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_only_rank_0_writes_and_prints(ddp_scripts):
    root, (r0, r1) = ddp_scripts
    assert r1["writes"] == [] and r1["stdout"] == ""
    assert all(res == {} for res in r1["results"] if "stopped_at_step" not in res)
    lines = r0["stdout"].strip().splitlines()
    assert json.loads(lines[-1])["test"] == r0["results"][-1]["test"]
    record = json.loads((root / "runs" / "full" / "result.json").read_text())
    assert record["processes"] == WORLD and record["test"] == r0["results"][1]["test"]
    for f in ("best.pt", "last.pt", "training_curves.png", "recommender"):
        assert (root / "runs" / "full" / f).exists(), f
    # The recorder works: rank 0's writes would have been seen (it was installed on rank 1 only).
    hook_writes: list = []
    hook = _write_recorder(hook_writes, [root / "runs"])
    hook("open", (str(root / "runs" / "x"), "wb", 0))
    hook("os.rename", (str(root / "runs" / "x"), str(root / "runs" / "y"), -1, -1))
    assert len(hook_writes) == 2


# ----------------------------------------------------------------------------- a killed rank under torchrun
def test_torchrun_restart_after_a_killed_rank_ends_as_the_uninterrupted_run(ddp_scripts):
    """``torchrun --max-restarts 1``: rank 1 is killed (SIGKILL, the fault-injection test hook
    SIDREC_FAULT_KILL_AT_STEP) mid-epoch at step 15 of 20, after the step-10 checkpoint; torchrun
    restarts both workers, they resume from last.pt and end with the same best.pt, bit for bit,
    as the uninterrupted run of the same config (the fixture's ``runs/full``)."""
    import subprocess

    from tests.fixtures import dataset_bindings

    root, (r0, _) = ddp_scripts
    repo = Path(__file__).resolve().parents[1]
    out = root / "runs" / "killed"
    bindings = dataset_bindings(root / "data", root / "cache") + [
        f"train_decoder.tokenizer = '{root / 'runs' / 'rq'}'", f"train_decoder.out_dir = '{out}'",
        "train_decoder.max_steps = 20", "train_decoder.eval_every = 10", "train_decoder.device = 'cpu'"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "--max-restarts", "1", "--monitor-interval", "0.5", "train_decoder.py", "configs/tiny/decoder_tiny.gin"]
    for b in bindings:
        cmd += ["--gin", b]
    env = {**os.environ, "SIDREC_FAULT_KILL_AT_STEP": "15", "SIDREC_FAULT_KILL_RANK": "1", "OMP_NUM_THREADS": "1",
           "SIDREC_CACHE": str(root / "sidrec_cache"),  # the fixture's precision choice (measured once)
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-4000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    assert "rank 1 kills itself after step 15" in proc.stderr, log  # the fault did happen
    assert f"resumed from {out / 'last.pt'} at step 10" in proc.stderr, log  # ... and the restart resumed
    full = torch.load(root / "runs" / "full" / "best.pt", weights_only=False)
    killed = torch.load(out / "best.pt", weights_only=False)
    speed = "users_per_second"
    assert killed["step"] == full["step"] and {**killed["valid"], speed: 0} == {**full["valid"], speed: 0}
    assert full["model"].keys() == killed["model"].keys()
    assert all(torch.equal(full["model"][k], killed["model"][k]) for k in full["model"])
    assert json.loads(proc.stdout.strip().splitlines()[-1])["test"] == r0["results"][1]["test"]
