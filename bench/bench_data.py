"""Time the data pipeline: real Beauty (P5 + item file) and a synthetic ML-32M-size ratings.csv.

    python bench/bench_data.py                    # Beauty from ../shared/data + 32M synthetic rows
    python bench/bench_data.py --rows 2000000     # smaller synthetic run

The synthetic file is bench/bench_ml32m.py's (ML-32M's layout and shape: ~200k users, ~87.6k
movies, heavy-tailed activity and popularity, no duplicate pairs), made once with a fixed seed
into a temp folder and reused; bench/bench_ml32m.py times the same preparation and the T5
training step on it. Each pipeline run (parse -> dedup -> 5-core -> remap -> leave-one-out ->
parquet cache) happens in a fresh child process with a fresh cache, so its peak RSS is
measured alone. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_ml32m import make_synthetic_ml32m  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
BEAUTY = ROOT.parent / "shared" / "data" / "amazon2014" / "beauty"


def run_child(code: str) -> tuple[dict, float]:
    """Run ``code`` in a fresh Python; return its last-line JSON and its peak RSS (MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child failed with code {proc.returncode}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over finished children, in KB
    return json.loads(proc.stdout.strip().splitlines()[-1]), max(peak, before) / 1024


PIPELINE = """
import json, time, warnings
warnings.simplefilter("ignore")
from data.prepare import load_dataset
t0 = time.time()
ds = load_dataset({source!r}, path={path!r}, items={items!r}, version={version!r}, cache_dir={cache!r}, verbose=False)
n_train = len(ds.train_examples()); ds.eval_examples("test")
print(json.dumps(dict(seconds=time.time() - t0, users=ds.num_users, items=ds.num_items,
                      interactions=int(len(ds.flat)), train_examples=n_train)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32_000_000)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sidrec-bench-data"))
    ap.add_argument("--skip-beauty", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir)
    out: dict = {"machine_cores": os.cpu_count()}

    if not a.skip_beauty and BEAUTY.is_dir():
        with tempfile.TemporaryDirectory() as cache:
            res, rss = run_child(PIPELINE.format(source="p5", path=str(BEAUTY), version=None, cache=cache,
                                                 items=str(BEAUTY / "Amazon_Beauty.item.gz")))
        out.update(beauty_seconds=round(res["seconds"], 2), beauty_peak_rss_mb=round(rss),
                   beauty_users=res["users"], beauty_items=res["items"], beauty_interactions=res["interactions"])

    t0 = time.time()
    folder = work / f"ml-32m-synthetic-{a.rows}-seed0"
    shape = make_synthetic_ml32m(folder, a.rows)
    out["ml32m_generate_seconds"] = round(time.time() - t0, 2)
    with tempfile.TemporaryDirectory(dir=work) as cache:
        res, rss = run_child(PIPELINE.format(source="movielens", path=str(folder), items=None, version="32m",
                                             cache=cache))
    out.update(ml32m_rows=shape["rows"], ml32m_seconds=round(res["seconds"], 2),
               ml32m_peak_rss_mb=round(rss), ml32m_users=res["users"], ml32m_items=res["items"],
               ml32m_interactions=res["interactions"], ml32m_train_examples=res["train_examples"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
