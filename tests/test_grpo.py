"""GRPO fine-tuning (train_grpo.py, modules/grpo.py, modules/rewards.py, modules/sampling.py):
known answers for the objective and the rewards, trie-constrained sampling against the
model's exact constrained distribution, and end-to-end runs on the tests/fixtures.py dataset
after a short SFT run (the in-group hit rate rises; exact resume)."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_decoder
import train_grpo
import train_rqvae
from modules.beam_search import PrefixTrie
from modules.grpo import grpo_batch_loss, grpo_objective, group_advantages
from modules.intervals import RunRanks, metrics_from_ranks
from modules.recommender import GenerativeRecommender, RecordMissingError
from modules.rewards import group_rewards, rank_reward, rule_reward, semantic_reward
from modules.sampling import beam_candidates, sample_items
from modules.tokens import TokenLayout
from modules.transformers.generation import shift_right, target_log_probs
from modules.transformers.gpt import GPT, GPTConfig
from modules.transformers.t5 import T5, T5Config
from tests.fixtures import dataset_bindings, run_script, write_p5_dataset

SIZES = (3, 4, 2)
SMALL = dict(d_model=16, num_heads=2, d_head=8, d_ff=32, dropout=0.0)


def tiny_setup(architecture="t5", num_items=13, seed=0):
    """A random tiny model, a catalogue of ``num_items`` distinct codes and 3 histories."""
    g = torch.Generator().manual_seed(seed)
    every = torch.tensor(list(itertools.product(*[range(s) for s in SIZES])))
    codes = every[torch.randperm(len(every), generator=g)[:num_items]]
    layout = TokenLayout(SIZES, num_user_buckets=4)
    torch.manual_seed(seed)
    vocab = dict(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size)
    model = T5(T5Config(**vocab, **SMALL, num_encoder_layers=1, num_decoder_layers=1)) if architecture == "t5" \
        else GPT(GPTConfig(**vocab, **SMALL, num_layers=1))
    with torch.no_grad():  # sharper than the init's near-uniform outputs
        for p in model.parameters():
            p.mul_(3.0)
    history = torch.tensor([[0, 4, 7, -1], [2, -1, -1, -1], [5, 6, 1, 3]])
    input_ids, mask = layout.encode_history(history, codes, torch.tensor([0, 1, 2]))
    return model.eval(), layout, codes, PrefixTrie(codes, SIZES), history, input_ids, mask


def exact_distribution(model, layout, codes, input_ids, mask, temperature, top_k):
    """Naive reference: P(item) for every user, the product over levels of the softmax of the
    teacher-forced logits / temperature over the codes valid after the item's prefix (a set of
    Python tuples), cut to the top_k of them."""
    n, num_items = input_ids.shape[0], len(codes)
    labels = layout.codes_to_tokens(codes)
    prefixes = {tuple(c[:level].tolist()) + (int(c[level]),) for c in codes for level in range(len(SIZES))}
    probs = torch.ones(n, num_items, dtype=torch.float64)
    with torch.no_grad():
        for u in range(n):
            logits = model(input_ids[u:u + 1].expand(num_items, -1), mask[u:u + 1].expand(num_items, -1),
                           shift_right(labels)).double()
            for i, level in itertools.product(range(num_items), range(len(SIZES))):
                off, size = layout.offsets[level], SIZES[level]
                prefix = tuple(codes[i, :level].tolist())
                valid = [c for c in range(size) if prefix + (c,) in prefixes]
                scores = {c: float(logits[i, level, off + c]) / temperature for c in valid}
                if top_k is not None:
                    kth = sorted(scores.values(), reverse=True)[min(top_k, len(scores)) - 1]
                    scores = {c: s for c, s in scores.items() if s >= kth}
                z = sum(math.exp(s) for s in scores.values())
                probs[u, i] *= math.exp(scores[int(codes[i, level])]) / z if int(codes[i, level]) in scores else 0.0
    return probs


# ----------------------------------------------------------------------------- objective


def test_advantages_known_answers():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [0.0, 2.0, 1.0, 3.0]])
    a = group_advantages(r, eps=0.0)
    assert torch.allclose(a.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(a[1], torch.zeros(4))  # equal rewards: no signal
    # Group 0: mean 0.25, sample std 0.5.
    assert torch.allclose(a[0], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.allclose(a[2].std(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_objective_at_step0_and_known_ratio():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 4, 3, generator=g), -1).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 0.5, -0.5], [0.0, 2.0, -2.0, 0.0]])
    out = grpo_objective(logp, logp.detach(), logp.detach(), adv, clip_eps=0.2, beta=0.04)
    # Policy = sampler = reference: ratio 1, KL 0, nothing clipped, loss = -mean(A).
    assert float(out.kl) == 0.0 and float(out.clip_fraction) == 0.0
    assert torch.isclose(out.loss, -adv.mean())
    out.loss.backward()  # the gradient is REINFORCE's: -A / (n G) on each token's log-prob
    assert torch.allclose(logp.grad, (-adv / adv.numel())[..., None].expand_as(logp))
    # Off-policy: a sequence 0.5 nats more likely than under the sampler is clipped when A > 0.
    old = logp.detach().clone()
    old[0, 0, 0] -= 0.5
    ref = logp.detach().clone()
    ref[0, 1, :] += 0.1  # per-token k3 of d = 0.1: e^0.1 - 1.1, summed over 3 tokens
    out = grpo_objective(logp.detach(), old, ref, adv, clip_eps=0.2, beta=1.0)
    assert float(out.clip_fraction) == pytest.approx(1 / 8)
    kl = 3 * (math.exp(0.1) - 1.1)
    assert float(out.kl) == pytest.approx(kl / 8, rel=1e-5)
    surrogate = adv.clone()
    surrogate[0, 0] = 1.2 * adv[0, 0]
    assert float(out.loss) == pytest.approx(float(-(surrogate.sum() - kl) / 8), rel=1e-5)


def test_k3_kl_gradient_known_answer():
    """The KL term's gradient, not only its value: d/d log pi of beta * (e^d - d - 1), d = log pi_ref
    - log pi, is beta * (1 - e^d) per token (pulls log pi towards log pi_ref), over the n x G mean;
    on-policy it adds to the surrogate's REINFORCE gradient -A / (n G)."""
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(2, 3, 4, generator=g), -1).requires_grad_(True)
    d = 0.3 * torch.randn(2, 3, 4, generator=g, dtype=torch.float32)  # per-token log pi_ref - log pi
    ref = logp.detach() + d
    beta = 0.5
    out = grpo_objective(logp, logp.detach(), ref, torch.zeros(2, 3), beta=beta)  # A = 0: the KL term alone
    kl = (d.exp() - d - 1).sum(-1)
    assert float(out.kl) == pytest.approx(float(kl.mean()), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(beta * float(kl.mean()), rel=1e-5)
    out.loss.backward()
    want = beta * (1 - d.exp()) / 6
    assert torch.allclose(logp.grad, want, atol=1e-7)
    assert ((logp.grad < 0) == (d > 0)).all()  # below the reference: pushed up; above: pushed down
    logp.grad = None
    adv = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.5, -1.0]])
    grpo_objective(logp, logp.detach(), ref, adv, beta=beta).loss.backward()
    assert torch.allclose(logp.grad, want - (adv / 6)[..., None], atol=1e-7)


def test_batch_loss_step0_ratio_one_kl_zero():
    model, layout, codes, trie, history, _, _ = tiny_setup()
    reference = T5(model.config).eval()
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    stats = grpo_batch_loss(model, reference, layout, codes, trie, history, torch.tensor([0, 1, 2]),
                            torch.tensor([0, 1, 2]), mode="sample", group_size=6)
    assert stats.kl == 0.0 and stats.clip_fraction == 0.0
    stats.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- rewards


def test_rewards_known_answers():
    items = torch.tensor([[3, 7, 5, 9], [1, 2, 4, 8]])
    target = torch.tensor([5, 0])  # group 0 holds the target at rank 2; group 1 misses
    assert torch.equal(rule_reward(items, target), torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 0]]))
    w = [1 / math.log2(i + 2) for i in (0, 1, 3)]  # the misses' ranks in group 0
    expect = torch.tensor([[-w[0], -w[1], 0.0, -w[2]], [0.0, 0, 0, 0]]) / torch.tensor([[sum(w)], [1.0]])
    assert torch.allclose(rank_reward(items, target), expect)
    assert float(rank_reward(items, target)[0].sum()) == pytest.approx(-1.0)
    # Ranks given explicitly (sampling: by policy probability) replace the column order.
    rank = torch.tensor([[3, 2, 0, 1], [0, 1, 2, 3]])
    w = {3: 1 / math.log2(5), 2: 1 / math.log2(4), 1: 1 / math.log2(3)}
    total = sum(w.values())
    assert torch.allclose(rank_reward(items, target, rank)[0], torch.tensor([-w[3], -w[2], 0.0, -w[1]]) / total)
    emb = torch.zeros(10, 2)
    emb[:, 0] = 1.0
    emb[7] = torch.tensor([0.0, 2.0])  # orthogonal to the target's
    emb[9] = torch.tensor([1.0, 1.0])  # 45 degrees
    sem = semantic_reward(items, target, emb, alpha=0.5)
    assert torch.allclose(sem[0], torch.tensor([0.5, 0.0, 0.5, 0.5 / math.sqrt(2)]))
    both = group_rewards(("rule", "rank"), items, target)
    assert torch.allclose(both, rule_reward(items, target) + rank_reward(items, target))
    with pytest.raises(ValueError, match="item_embeddings"):
        group_rewards(("semantic",), items, target)
    # Equal explicit ranks share one value; ranks are dense (the next distinct rank follows).
    tied = rank_reward(torch.tensor([[1, 2, 3, 5]]), torch.tensor([5]), torch.tensor([[0, 0, 2, 3]]))
    w0, w1 = 1.0, 1 / math.log2(3)
    assert torch.allclose(tied, torch.tensor([[-w0, -w0, -w1, 0.0]]) / (2 * w0 + w1))
    with pytest.raises(ValueError, match="subset"):
        group_rewards(("bogus",), items, target)


def test_rank_reward_repeated_samples_share_one_penalty():
    """Sampling draws an item several times, and the policy's ties among its copies are broken by
    column: every copy of a wrong item must still pay the one penalty of the item's rank among
    the group's distinct items (modules/rewards.py's docstring), the group's penalties summing to -1."""
    items = torch.tensor([[4, 1, 4, 9, 7], [4, 1, 4, 9, 7]])
    target = torch.tensor([9, 9])
    rank = torch.tensor([[0, 1, 2, 3, 4], [2, 1, 0, 3, 4]])  # the copies of item 4 ordered either way
    w = [1 / math.log2(r + 2) for r in range(4)]  # distinct items by rank: 4 -> 0, 1 -> 1, 9 -> 2, 7 -> 3
    miss = torch.tensor([-w[0], -w[1], -w[0], 0.0, -w[3]]) / (2 * w[0] + w[1] + w[3])
    got = rank_reward(items, target, rank)
    assert torch.allclose(got, miss.expand(2, -1))
    assert torch.allclose(got.sum(1), -torch.ones(2))
    # Through grpo_batch_loss's sampling and ranking (a peaked model draws repeats): every
    # row's copies of an item get one reward.
    model, layout, codes, trie, history, _, _ = tiny_setup()
    seen = []

    def spy(kinds, items, target, rank=None, *args):
        out = group_rewards(kinds, items, target, rank, *args)
        seen.append((items, out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("modules.grpo.group_rewards", spy)
        torch.manual_seed(0)
        sampled = grpo_batch_loss(model, model, layout, codes, trie, history, torch.tensor([0, 1, 2]), None,
                                  mode="sample", group_size=12, rewards=("rank",))
        assert sampled.group_hit > 0  # some group holds its target (rank penalties apply)
    items, reward = seen[0]
    repeats = 0
    for row_items, row_reward in zip(items.tolist(), reward.tolist()):
        by_item = {}
        for i, r in zip(row_items, row_reward):
            by_item.setdefault(i, set()).add(r)
        assert all(len(v) == 1 for v in by_item.values()), by_item
        repeats += len(row_items) - len(by_item)
    assert repeats > 0  # the check saw repeated samples


# ----------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("architecture", ["t5", "gpt"])
@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, 2)])
def test_sampling_matches_constrained_distribution(architecture, temperature, top_k):
    model, layout, codes, trie, _, input_ids, mask = tiny_setup(architecture)
    exact = exact_distribution(model, layout, codes, input_ids, mask, temperature, top_k)
    assert torch.allclose(exact.sum(1), torch.ones(3, dtype=torch.float64))
    num = 4000
    out = sample_items(model, input_ids, mask, trie, layout, num, temperature, top_k,
                       generator=torch.Generator().manual_seed(0))
    assert out.items.shape == (3, num) and (out.items >= 0).all()  # only real items
    assert torch.equal(layout.codes_to_tokens(codes)[out.items], out.tokens)
    freq = torch.stack([torch.bincount(row, minlength=len(codes)) for row in out.items]).double() / num
    # Each frequency within 5 binomial standard errors (+ a floor for p ~ 0) of its probability.
    tol = 5 * (exact * (1 - exact) / num).sqrt() + 1e-3
    assert ((freq - exact).abs() <= tol).all(), (freq - exact).abs().max()
    # The check can fail: another temperature's distribution is rejected.
    other = exact_distribution(model, layout, codes, input_ids, mask, temperature * 3, top_k)
    assert not ((freq - other).abs() <= 5 * (other * (1 - other) / num).sqrt() + 1e-3).all()


@pytest.mark.parametrize("architecture", ["t5", "gpt"])
def test_beam_candidates_distinct_valid(architecture):
    model, layout, codes, trie, _, input_ids, mask = tiny_setup(architecture)
    out = beam_candidates(model, input_ids, mask, trie, layout, 8)
    assert out.items.shape == (3, 8) and (out.items >= 0).all()
    assert all(len(set(row.tolist())) == 8 for row in out.items)
    assert torch.equal(layout.codes_to_tokens(codes)[out.items], out.tokens)
    # Best first by the model's (raw) sequence log-probability.
    labels = out.tokens.flatten(0, 1)
    rows = input_ids.repeat_interleave(8, 0), mask.repeat_interleave(8, 0)
    with torch.no_grad():
        seq = target_log_probs(model, *rows, labels).sum(-1).view(3, 8)
    assert (seq[:, :-1] >= seq[:, 1:] - 1e-5).all()
    with pytest.raises(ValueError, match="catalogue"):
        beam_candidates(model, input_ids, mask, trie, layout, 14)


# ----------------------------------------------------------------------------- end to end

SFT_STEPS = 150


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """The fixture dataset, its tiny tokenizer and a short SFT run of the tiny T5 recipe."""
    root = tmp_path_factory.mktemp("grpo")
    base = dataset_bindings(write_p5_dataset(root / "data"), root / "cache")
    run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin", base + [f"train_rqvae.out_dir = '{root / 'rq'}'"])
    base += [f"RQVAE_DIR = '{root / 'rq'}'"]
    res = run_script(train_decoder.main, "configs/tiny/decoder_tiny.gin", base + [
        f"train_decoder.out_dir = '{root / 'sft'}'", f"train_decoder.max_steps = {SFT_STEPS}",
        "train_decoder.eval_every = 50", "train_decoder.precision = 'fp32'"])
    return root, base, res


def grpo(sft, out, *extra):
    root, base, _ = sft
    return run_script(train_grpo.main, "configs/tiny/grpo_tiny.gin", base + [
        f"train_grpo.sft_dir = '{root / 'sft'}'", f"train_grpo.out_dir = '{out}'", "train_grpo.eval_users = None",
        *extra])


def assert_reported(out, res, users):
    """modules/reporting.py test_report's part of the result: bootstrap intervals around the
    figures, the history-removed test and every tested user's rank in result.ranks.npz."""
    assert set(res["intervals"]) == {"valid", "test", "test_history_removed", "popularity"}
    assert res["invalid_rate"] is None  # constrained search only: not measured
    saved = json.loads((out / "result.json").read_text())
    assert saved["ranks_file"] == "result.ranks.npz" and "ranks" not in saved
    ranks = RunRanks.load(out / "result.ranks.npz")
    for name in ("valid", "test"):
        assert len(ranks.parts[name][0]) == users
        from_ranks = metrics_from_ranks(ranks.parts[name][0])
        assert res[name] == {k: pytest.approx(from_ranks[k], abs=1e-12) for k in res[name]}, name
    for name in ("valid", "test", "popularity"):
        assert all(low <= res[name][k] <= high for k, (low, high) in res["intervals"][name].items()), name


def hit_rate_rose(res) -> bool:
    first, last = res["hit_rate_first"], res["hit_rate_last"]
    return last >= first + 0.03 and last >= 1.25 * first


def test_grpo_raises_in_group_hit_rate(sft, tmp_path):
    """The tiny recipe (100 steps of 32 users x 8 samples, lr 1e-3) after a short SFT run. Measured:
    the in-group hit rate (fraction of samples that are the target) went 0.092 -> 0.153 from the
    first to the last 20 steps (each window ~5k samples in 640 groups); KL to the SFT model ~1.3.
    Control: the same run at lr 0 (the SFT model throughout: the windows differ only in their
    users and draws) must not pass the criterion, nor move off the SFT model."""
    res = grpo(sft, tmp_path / "run")
    assert res["steps"] == 100
    assert res["sft_test"] == pytest.approx({k: sft[2]["test"][k] for k in res["sft_test"]})  # same start
    first, last = res["hit_rate_first"], res["hit_rate_last"]
    assert hit_rate_rose(res), f"in-group hit rate {first:.3f} -> {last:.3f}"
    assert 0 <= res["train_clip_fraction"] == 0.0 and res["train_kl"] > 0.1
    frozen = grpo(sft, tmp_path / "frozen", "train_grpo.lr = 0.0")
    assert not hit_rate_rose(frozen), f"lr 0: {frozen['hit_rate_first']:.3f} -> {frozen['hit_rate_last']:.3f}"
    assert abs(frozen["hit_rate_last"] - frozen["hit_rate_first"]) < 0.03
    assert abs(frozen["train_kl"]) < 1e-6 and frozen["valid"] == frozen["sft_valid"]  # never left the SFT model


def test_grpo_never_returns_worse_than_its_sft_start(sft, tmp_path):
    """A learning rate that wrecks the model: every GRPO validation is below the SFT model's on
    the same validation users, so best.pt stays the SFT model (the tracker starts at its figure)
    and the run reports the SFT model's metrics."""
    res = grpo(sft, tmp_path / "wreck", "train_grpo.lr = 1.0", "train_grpo.warmup_steps = 0",
               "train_grpo.max_steps = 4", "train_grpo.eval_every = 2", "train_grpo.eval_users = 100")
    assert res["steps"] == 4 and res["best_step"] == 0, res
    assert res["valid"] == res["sft_valid"] and res["test"] == res["sft_test"]
    best = torch.load(tmp_path / "wreck" / "best.pt", weights_only=False)
    sft_weights = torch.load(sft[0] / "sft" / "best.pt", weights_only=False)["model"]
    assert best["step"] == 0 and all(torch.equal(best["model"][k], sft_weights[k]) for k in sft_weights)
    last = torch.load(tmp_path / "wreck" / "last.pt", weights_only=False)
    assert not all(torch.equal(last["model"][k], sft_weights[k]) for k in sft_weights)  # it did train
    curve = last["extra"]["curves"]["ndcg@10"]
    assert [s for s, _ in curve] == [2, 4] and all(v < last["extra"]["best"] for _, v in curve)


def test_grpo_exact_resume(sft, tmp_path):
    extra = ("train_grpo.max_steps = 6", "train_grpo.log_every = 2", "train_grpo.eval_every = 3",
             "train_grpo.rewards = ('rule', 'rank')", "train_grpo.lr = 3e-4", "train_grpo.warmup_steps = 2")
    whole = grpo(sft, tmp_path / "whole", *extra)
    part = grpo(sft, tmp_path / "part", *extra, "train_grpo.stop_after_steps = 4")
    assert part["stopped_at_step"] == 4
    resumed = grpo(sft, tmp_path / "part", *extra)
    assert resumed["steps"] == whole["steps"] == 6
    assert resumed["valid"] == whole["valid"] and resumed["test"] == whole["test"]
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    sft_weights = torch.load(sft[0] / "sft" / "best.pt", weights_only=False)["model"]
    assert not all(torch.equal(a[k], sft_weights[k]) for k in a)  # it did train


def test_grpo_report_max_users(sft, tmp_path):
    """bench/check_docs.py's smoke runs bind test_report.max_users: the final valid and test, and
    the SFT start's, on that many users (one fixed sample). At lr 0 best.pt stays the SFT model,
    so its start and the report must give the same figures: the same users."""
    res = grpo(sft, tmp_path / "few", "train_grpo.lr = 0.0", "train_grpo.max_steps = 2", "train_grpo.eval_every = 2",
               "train_grpo.eval_users = 50", "test_report.max_users = 30")
    assert res["test_users"] == 30 and res["best_step"] == 0
    assert res["valid"] == res["sft_valid"] and res["test"] == res["sft_test"]
    assert json.loads((tmp_path / "few" / "sft_metrics.json").read_text())["max_users"] == 30
    assert_reported(tmp_path / "few", res, 30)


def test_grpo_refuses_its_sft_dir(sft):
    root = sft[0]
    with pytest.raises(ValueError, match="SFT run's folder"):
        grpo(sft, root / "sft")


def test_grpo_imports_no_train_script():
    """train_grpo.py's configs include a train_decoder.py recipe (its data settings; and
    bench/leaderboard.sh passes the SFT run's configs): with train_grpo.py alone imported, in a
    fresh process, its command line parses them, skipping the SFT script's own train_decoder.*
    bindings (the model comes from the SFT run's record) and keeping the rest; any other unknown
    name is still an error."""
    code = ("import sys, gin, train_grpo\n"
            "from modules.training import parse_gin_cli\n"
            "parse_gin_cli(['configs/grpo_gpt_amazon.gin', 'bench/configs/beauty_local.gin', 'bench/configs/cpu_grpo.gin'],\n"
            "              skip_unknown=['train_decoder'])\n"
            "assert not [m for m in sys.modules if m.startswith('train_') and m != 'train_grpo'], sys.modules\n"
            "assert 'train_decoder.' not in gin.config_str()\n"
            "print(gin.query_parameter('GPTConfig.num_layers'), gin.query_parameter('load_dataset.max_history'))\n"
            "gin.clear_config()\n"
            "try:\n"
            "    parse_gin_cli(['configs/grpo_gpt_amazon.gin', '--gin', 'train_decodr.lr = 1'], skip_unknown=['train_decoder'])\n"
            "except SystemExit as e:\n"
            "    print('refused' if 'train_decodr' in str(e) else e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "20", "refused"]


def test_grpo_starts_from_the_sft_record_and_exports(sft, tmp_path):
    """The SFT model is rebuilt from its best.pt's recommender record, not from the sizes of the
    gin config in force (here another T5 size, which used to fail to load its weights); the GRPO
    run's best.pt carries a record of its own and the run exports what from_pretrained serves.
    An SFT best.pt without a record is refused, naming it."""
    root = sft[0]
    res = grpo(sft, tmp_path / "run", "T5Config.d_model = 48", "train_grpo.max_steps = 2", "train_grpo.eval_every = 2",
               "train_grpo.eval_users = 50")
    assert res["steps"] == 2 and res["recommender"] == str(tmp_path / "run" / "recommender")
    record = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["recommender"]
    sft_record = torch.load(root / "sft" / "best.pt", weights_only=False)["recommender"]
    assert record["config"]["model_config"] == sft_record["config"]["model_config"]
    assert record["config"]["tokenizer"] == sft_record["config"]["tokenizer"]
    assert record["config"]["beam_size"] == 10  # the GRPO run's (configs/tiny/grpo_tiny.gin)
    assert "test_users" not in res
    assert_reported(tmp_path / "run", res, 150)  # every fixture user
    rec = GenerativeRecommender.from_pretrained(tmp_path / "run", device="cpu")
    assert rec.config["checkpoint"] and rec.architecture == "t5"
    old = tmp_path / "old_sft"
    old.mkdir()
    state = torch.load(root / "sft" / "best.pt", weights_only=False)
    state.pop("recommender")
    torch.save(state, old / "best.pt")
    with pytest.raises(RecordMissingError, match=f"{old}: best.pt has no recommender record"):
        run_script(train_grpo.main, "configs/tiny/grpo_tiny.gin", sft[1] + [
            f"train_grpo.sft_dir = '{old}'", f"train_grpo.out_dir = '{tmp_path / 'from_old'}'"])
