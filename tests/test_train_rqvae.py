"""train_rqvae.py end to end on a tiny fixture dataset: outputs, Hub-style round trip,
exact resume, clear errors for bad gin bindings, and IDs that have not collapsed (the tiny
recipe on the fixture and on real MovieLens 100K)."""

import gin
import pytest
import torch

import train_rqvae
from modules.semantic_ids import SemanticIdTokenizer
from tests.fixtures import CATEGORIES, dataset_bindings, write_p5_dataset

TINY = "configs/tiny/rqvae_tiny.gin"
# The tiny recipe's schedule, which the resume and selection tests below are written against.
MAX_STEPS, EVAL_EVERY = 200, 50


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("p5")
    return write_p5_dataset(root / "data"), root / "cache"


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def run(data, out, *extra):
    folder, cache = data
    args = [TINY]
    for b in dataset_bindings(folder, cache) + [f"train_rqvae.out_dir = '{out}'", *extra]:
        args += ["--gin", b]
    gin.clear_config()
    return train_rqvae.main(args)


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):
    """One run of the tiny recipe on the fixture, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    return run(data, out), out


def test_tiny_rqvae_end_to_end(tiny_run):
    res, out = tiny_run
    assert (res["steps"], res["selected_step"] % EVAL_EVERY) == (MAX_STEPS, 0)
    assert res["unique_after_dedup"] is True and res["num_items"] == 60
    assert set(res) >= {"collision_rate", "max_group", "codebook_usage", "recon_loss", "seconds"}
    assert len(res["codebook_usage"]) == 3 and 0 < res["codebook_usage"][0] <= 1
    tok = SemanticIdTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.item_codes.shape == (60, 4)
    assert len({tuple(r) for r in tok.item_codes.tolist()}) == 60
    assert (out / "codebook_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "collision_groups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "tokenizer" / "README.md").read_text()  # the model card pushed with it
    assert f"collision_rate: {res['collision_rate']}" in card and "train_rqvae.max_steps" in card


def test_tiny_recipe_does_not_collapse_on_fixture(tiny_run):
    """Every level spreads the 60 fixture items over at least as many codes as the fixture has
    categories. The old recipe put all 60 on one code at every level (collision 1.0), so the
    tiny end-to-end runs trained on the dedup index alone."""
    res, out = tiny_run
    codes = SemanticIdTokenizer.from_pretrained(str(out / "tokenizer")).item_codes[:, :3]
    distinct = [int(codes[:, level].unique().numel()) for level in range(3)]
    assert min(distinct) >= len(CATEGORIES), distinct
    assert min(res["codebook_perplexity"]) >= len(CATEGORIES), res["codebook_perplexity"]
    # 60 items on 32^3 codes: near-duplicate titles ("Acme Lipstick no. 0" / "no. 12") may share one.
    assert res["collision_rate"] <= 0.5


def test_tiny_recipe_on_movielens_100k(shared_data, tmp_path):
    """The tiny recipe as its config runs it (MiniLM embeddings of ML-100K): few collisions and
    every level used. Before: collision 0.999, max_group 1348, usage 0.06/0.12/0.06."""
    args = [TINY]
    for b in [f"load_dataset.path = '{shared_data / 'movielens' / 'ml-100k'}'",
              f"load_dataset.cache_dir = '{tmp_path / 'cache'}'", "load_dataset.verbose = False",
              f"train_rqvae.out_dir = '{tmp_path / 'run'}'"]:
        args += ["--gin", b]
    res = train_rqvae.main(args)
    assert res["num_items"] == 1349
    assert res["collision_rate"] < 0.3
    assert all(u > 0.5 for u in res["codebook_usage"]), res["codebook_usage"]


def test_resume_reaches_same_codes(data, tmp_path):
    full = run(data, tmp_path / "full")
    # Stop between two evals: the resumed run must also restore the best eval so far.
    stop = 2 * EVAL_EVERY + EVAL_EVERY // 2
    part = run(data, tmp_path / "split", f"train_rqvae.stop_after_steps = {stop}")
    assert part["stopped_at_step"] == stop and (tmp_path / "split" / "best.pt").exists()
    resumed = run(data, tmp_path / "split")
    assert resumed["steps"] == full["steps"] == MAX_STEPS
    assert resumed["selected_step"] == full["selected_step"]
    a = SemanticIdTokenizer.from_pretrained(str(tmp_path / "full" / "tokenizer"))
    b = SemanticIdTokenizer.from_pretrained(str(tmp_path / "split" / "tokenizer"))
    assert torch.equal(a.item_codes, b.item_codes)
    for (name, x), (_, y) in zip(a.quantizer.state_dict().items(), b.quantizer.state_dict().items()):
        assert torch.equal(x, y), name


def item_embeddings(data) -> torch.Tensor:
    """The fixture items' embeddings as train_rqvae loads them (from the shared cache)."""
    from data.prepare import load_dataset, load_item_embeddings

    folder, cache = data
    gin.clear_config()
    gin.parse_config_files_and_bindings([], dataset_bindings(folder, cache))
    try:
        return torch.from_numpy(load_item_embeddings(load_dataset())).float()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("config", ["RQKMeansConfig", "FSQConfig"])
def test_other_quantizers(data, tmp_path, config):
    """The saved item table is the trained quantizer's nearest codes of the items, and the
    reloaded tokenizer reproduces it, checked against references computed outside the
    quantizer's encode: RQ-KMeans' nearest-centroid residual chain by hand from its saved
    centroids; FSQ's codes decoded back (indices -> grid values -> decoder) equal the eval
    forward's reconstruction (quantized values -> decoder). Both reproduce the reconstruction
    error train_rqvae reported from the in-memory model before saving."""
    extra = [f"train_rqvae.quantizer = @{config}()"]
    if config == "RQKMeansConfig":
        extra += ["RQKMeansConfig.codebook_size = 8", "RQKMeansConfig.balanced = True"]
    else:
        extra += ["FSQConfig.hidden_dims = [32]", "FSQConfig.fsq_levels = [3, 3]"]
    res = run(data, tmp_path / config, *extra)
    assert res["unique_after_dedup"] is True
    tok = SemanticIdTokenizer.from_pretrained(str(tmp_path / config / "tokenizer"))
    emb = item_embeddings(data)
    q = tok.quantizer
    levels = len(q.codebook_sizes)
    table = tok.item_codes[:, :levels]
    assert torch.equal(tok.encode(emb), table)
    if config == "RQKMeansConfig":
        residual, by_hand = emb.double(), []
        for cent in q.centroids.double():
            code = torch.cdist(residual, cent).argmin(1)
            residual = residual - cent[code]
            by_hand.append(code)
        assert torch.equal(torch.stack(by_hand, 1), table)
        recon = q.decode(table)
        # the centroids fit the items: rebuilding from the codes beats the mean embedding
        assert res["recon_loss"] < 0.5 * (emb - emb.mean(0)).pow(2).mean().item()
    else:
        recon = q.decode_codes(table)
        with torch.no_grad():
            torch.testing.assert_close(q.eval()(emb).recon, recon)
    assert torch.nn.functional.mse_loss(recon, emb).item() == pytest.approx(res["recon_loss"], rel=1e-5)


@pytest.mark.parametrize("binding,message", [
    ("train_rqvae.no_such_arg = 1", "no_such_arg"),
    ("trian_rqvae.max_steps = 1", "trian_rqvae"),
    ("RQVAEConfig.quantize_mode = 'bogus'", "quantize_mode"),
])
def test_wrong_gin_binding_is_a_clear_error(data, tmp_path, binding, message):
    with pytest.raises((SystemExit, ValueError), match=message):
        run(data, tmp_path / "bad", binding)


def test_dedup_overflow_is_a_clear_error(data, tmp_path):
    with pytest.raises(ValueError, match="dedup"):
        run(data, tmp_path / "overflow", "train_rqvae.dedup_size = 1", "RQVAEConfig.codebook_size = 2")


def test_codes_come_from_the_lowest_collision_eval(data, tiny_run, tmp_path):
    res, out = tiny_run
    best = torch.load(out / "best.pt", weights_only=False)["extra"]
    assert res["selected_step"] == best["step"] in range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY)
    assert res["collision_rate"] == pytest.approx(best["collision_rate"])
    last = run(data, tmp_path / "last", "train_rqvae.select_by = 'last'")
    assert last["selected_step"] == MAX_STEPS


def test_rebalanced_last_level_has_fewer_collisions_and_the_table_keeps_them(data, tmp_path):
    """rebalance_last_level re-chooses colliding items' last code: the saved table holds those
    codes, the collision rate is lower than the nearest codes' rate (reported beside it), and
    earlier levels are untouched. 50 steps: the fixture's IDs still collide there."""
    short = ["train_rqvae.max_steps = 50", "train_rqvae.warmup_steps = 10", "train_rqvae.select_by = 'last'"]
    plain_res = run(data, tmp_path / "plain", *short)
    plain = SemanticIdTokenizer.from_pretrained(plain_res["tokenizer"])
    res = run(data, tmp_path / "rb", *short, "train_rqvae.rebalance_last_level = True")
    tok = SemanticIdTokenizer.from_pretrained(res["tokenizer"])
    before = res["before_rebalance"]
    assert before["collision_rate"] == plain_res["collision_rate"] > 0  # same seed: the same trained weights
    assert res["collision_rate"] < before["collision_rate"]
    assert torch.equal(tok.item_codes[:, :-2], plain.item_codes[:, :-2])
    assert not torch.equal(tok.item_codes[:, -2], plain.item_codes[:, -2])
    assert res["unique_after_dedup"]
