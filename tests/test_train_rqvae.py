"""train_rqvae.py end to end on a tiny fixture dataset: outputs, Hub-style round trip,
exact resume, and clear errors for bad gin bindings."""

import gin
import pytest
import torch

import train_rqvae
from modules.semantic_ids import SemanticIdTokenizer
from tests.fixtures import dataset_bindings, write_p5_dataset

TINY = "configs/tiny/rqvae_tiny.gin"


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


def test_tiny_rqvae_end_to_end(data, tmp_path):
    res = run(data, tmp_path / "run")
    assert res["unique_after_dedup"] is True and res["num_items"] == 60
    assert set(res) >= {"collision_rate", "max_group", "codebook_usage", "recon_loss", "seconds"}
    assert len(res["codebook_usage"]) == 3 and 0 < res["codebook_usage"][0] <= 1
    tok = SemanticIdTokenizer.from_pretrained(str(tmp_path / "run" / "tokenizer"))
    assert tok.item_codes.shape == (60, 4)
    assert len({tuple(r) for r in tok.item_codes.tolist()}) == 60
    assert (tmp_path / "run" / "codebook_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reaches_same_codes(data, tmp_path):
    full = run(data, tmp_path / "full")
    # Stop between the two evals (30, 60): the resumed run must also restore the best eval so far.
    part = run(data, tmp_path / "split", "train_rqvae.stop_after_steps = 35")
    assert part["stopped_at_step"] == 35 and (tmp_path / "split" / "best.pt").exists()
    resumed = run(data, tmp_path / "split")
    assert resumed["steps"] == full["steps"] == 60
    assert resumed["selected_step"] == full["selected_step"]
    a = SemanticIdTokenizer.from_pretrained(str(tmp_path / "full" / "tokenizer"))
    b = SemanticIdTokenizer.from_pretrained(str(tmp_path / "split" / "tokenizer"))
    assert torch.equal(a.item_codes, b.item_codes)
    for (name, x), (_, y) in zip(a.quantizer.state_dict().items(), b.quantizer.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("config", ["RQKMeansConfig", "FSQConfig"])
def test_other_quantizers(data, tmp_path, config):
    extra = [f"train_rqvae.quantizer = @{config}()"]
    if config == "RQKMeansConfig":
        extra += ["RQKMeansConfig.codebook_size = 8", "RQKMeansConfig.balanced = True"]
    else:
        extra += ["FSQConfig.hidden_dims = [32]", "FSQConfig.fsq_levels = [3, 3]"]
    res = run(data, tmp_path / config, *extra)
    assert res["unique_after_dedup"] is True
    tok = SemanticIdTokenizer.from_pretrained(str(tmp_path / config / "tokenizer"))
    emb = torch.randn(5, 384)
    assert torch.equal(tok.encode(emb), tok.quantizer.encode(emb))


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


def test_codes_come_from_the_lowest_collision_eval(data, tmp_path):
    res = run(data, tmp_path / "run")
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["extra"]
    assert res["selected_step"] == best["step"] in (30, 60)
    assert res["collision_rate"] == pytest.approx(best["collision_rate"])
    last = run(data, tmp_path / "last", "train_rqvae.select_by = 'last'")
    assert last["selected_step"] == 60
