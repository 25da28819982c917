#!/usr/bin/env bash
# The Beauty pipelines on one GPU in at most 9 minutes, start-up included, as one command:
#
#   bash bench/gpu_prepare.sh            # here, first: wheels -> .whl/, data -> .carry/
#   bash bench/gpu_reproduce.sh          # there: device run, carry [".whl", ".carry"]
#   bash bench/gpu_reproduce.sh --smoke  # the same stages on a CPU in about a minute (a fixture)
#
# Stages, in order: setup (installs the carried wheels where a package is missing; records GPU,
# torch, Python), rqvae (TIGER's RQ-VAE tokenizer), tiger (T5 over its IDs), sasrec (the ID
# baseline), gpt (all-positions GPT over the same IDs), actionpiece (if time is left). Each
# recommender trains up to its minutes (train_*.max_train_minutes, validation included) with
# validation-based selection, then tests its best checkpoint on every user. The minutes are cut to
# what the budget has left, keeping room for the stages after it; a stage that does not fit is
# skipped, and every stage runs under a hard `timeout` at the deadline, so the whole run cannot
# pass BUDGET_S (540 s) by more than a few seconds.
#
# Output, under $OUT (default: a new temp folder): results.jsonl, one JSON line per stage as it
# ends (stage, status ok/error/timeout/skipped, minutes, the train script's result JSON: valid and
# test metrics, popularity, steps, ...), then a summary line (GPU, torch, minutes per stage); and
# logs/<stage>.log (stderr + stdout of each stage). Exit status 1 when a stage failed.
# Environment: OUT, WORK (runs, caches, installed wheels; default a temp folder), BUDGET_S,
# PYTHON (default python3), STAGES (a subset, e.g. "rqvae tiger").
set -u
cd "$(dirname "$0")/.." || exit 1
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_reproduce.sh [--smoke]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_reproduce_out.XXXXXX")}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_reproduce_work.XXXXXX")}
BUDGET_S=${BUDGET_S:-$([ "$SMOKE" = 1 ] && echo 900 || echo 540)}
STAGES=${STAGES:-"rqvae tiger sasrec gpt actionpiece"}
RUNS=$WORK/runs
RESULTS=$OUT/results.jsonl
mkdir -p "$OUT/logs" "$RUNS"
: > "$RESULTS"
START=$(date +%s.%N)
DEADLINE=$(awk -v s="$START" -v b="$BUDGET_S" 'BEGIN {printf "%d", s + b}')
export PYTHONUNBUFFERED=1 SIDREC_CACHE=$WORK/cache WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
FAILED=0
STAGE_MINUTES=()  # "stage=minutes status"
echo "[gpu_reproduce] OUT=$OUT WORK=$WORK budget ${BUDGET_S}s smoke=$SMOKE" >&2

now() { date +%s.%N; }
left() { awk -v d="$DEADLINE" -v n="$(now)" 'BEGIN {printf "%d", d - n}'; }
minutes_since() { awk -v t="$1" -v n="$(now)" 'BEGIN {printf "%.2f", (n - t) / 60}'; }

# record STAGE STATUS MINUTES [STDOUT_FILE] [LOG] [EXTRA_JSON]: one JSON line in results.jsonl.
record() {
  "$PY" - "$@" >> "$RESULTS" <<'EOF'
import json, sys
stage, status, minutes = sys.argv[1:4]
stdout, log, extra = (sys.argv[4:] + ["", "", "{}"])[:3]
line = {"stage": stage, "status": status, "minutes": float(minutes)}
line.update(json.loads(extra or "{}"))
result = None
if stdout:
    try:
        lines = open(stdout).read().splitlines()
    except OSError:
        lines = []
    for text in reversed(lines):  # the train scripts' last stdout line is their result JSON
        try:
            result = json.loads(text)
            break
        except ValueError:
            continue
if result is not None:
    for key in ("valid", "test", "popularity", "collision_rate"):
        if key in result:
            line[key] = result[key]
    line["result"] = result
if status != "ok" and log:
    try:
        line["error"] = open(log, errors="replace").read().splitlines()[-15:]
    except OSError:
        pass
print(json.dumps(line))
EOF
}

# run_stage STAGE PLANNED_MIN MIN_MIN OVERHEAD_S RESERVE_S FN SCRIPT [ARGS...]: train SCRIPT with
# its max_train_minutes (FN.max_train_minutes; FN "-" for none) fitted to the budget: at most
# PLANNED_MIN, at least MIN_MIN or skipped, leaving OVERHEAD_S (start, data, test) for this stage
# and RESERVE_S for the stages after it. Hard limit: the deadline.
run_stage() {
  local stage=$1 planned=$2 minimum=$3 overhead=$4 reserve=$5 fn=$6 script=$7
  shift 7
  local t0 rem minutes limit rc status log=$OUT/logs/$stage.log stdout=$WORK/$stage.stdout
  local -a args=("$@")
  t0=$(now)
  rem=$(left)
  minutes=$(awk -v p="$planned" -v r="$rem" -v o="$overhead" -v R="$reserve" \
            'BEGIN {m = (r - o - R) / 60; if (m > p) m = p; printf "%.2f", m}')
  if [ "$rem" -le 2 ] || awk -v m="$minutes" -v q="$minimum" 'BEGIN {exit !(m < q)}'; then
    echo "[gpu_reproduce] $stage: skipped, ${rem}s left" >&2
    record "$stage" skipped 0 "" "" "{\"reason\": \"budget: ${rem} s left, needs ${minimum} min of training + ${overhead} s + ${reserve} s for later stages\"}"
    STAGE_MINUTES+=("$stage=0 skipped")
    return
  fi
  [ "$fn" != "-" ] && args+=(--gin "$fn.max_train_minutes = $minutes")
  limit=$((rem - 2))
  echo "[gpu_reproduce] $stage: $([ "$fn" = "-" ] && echo "its steps" || echo "up to $minutes min of training"), hard limit ${limit}s" >&2
  echo "\$ $PY $script ${args[*]}" > "$log"
  timeout -k 5 "$limit" "$PY" "$script" "${args[@]}" > "$stdout" 2>> "$log"
  rc=$?
  cat "$stdout" >> "$log"
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=error ;;
  esac
  [ "$status" = ok ] || FAILED=1
  local took
  took=$(minutes_since "$t0")
  echo "[gpu_reproduce] $stage: $status (rc $rc) in $took min" >&2
  record "$stage" "$status" "$took" "$stdout" "$log" \
    "{\"rc\": $rc, \"max_train_minutes\": $([ "$fn" = "-" ] && echo null || echo "$minutes"), \"log\": \"logs/$stage.log\"}"
  STAGE_MINUTES+=("$stage=$took $status")
  eval "STATUS_$stage=$status"
}

wants() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ---------------------------------------------------------------------------------- setup
t0=$(now)
setup_log=$OUT/logs/setup.log
: > "$setup_log"
setup_ok=1
if ! "$PY" -c "import gin, polars, vector_quantize_pytorch" >> "$setup_log" 2>&1; then
  if ls .whl/*.whl > /dev/null 2>&1; then
    echo "[gpu_reproduce] installing the carried wheels: $(ls .whl | tr '\n' ' ')" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      .whl/*.whl >> "$setup_log" 2>&1 || setup_ok=0
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gin, polars or vector_quantize_pytorch missing and no .whl/ (run bench/gpu_prepare.sh)" >> "$setup_log"
    setup_ok=0
  fi
fi
DATA_GIN=()
if [ "$SMOKE" = 1 ] && [ "$setup_ok" = 1 ]; then
  # A P5 fixture carried the way gpu_prepare.sh carries Beauty (its embeddings read as a file).
  fixture=$WORK/fixture/beauty
  "$PY" -c "import sys; from pathlib import Path; from tests.fixtures import write_p5_dataset; \
write_p5_dataset(Path(sys.argv[1]))" "$fixture" >> "$setup_log" 2>&1 &&
    bash bench/gpu_prepare.sh --data-only --p5 "$fixture" --items "$fixture/items.item" --min-count 1 \
      --carry "$WORK/carry" >> "$setup_log" 2>&1 || setup_ok=0
  DATA_GIN=(--gin "load_dataset.source = 'p5'" --gin "load_dataset.path = '$WORK/carry/beauty'"
            --gin "load_dataset.items = '$WORK/carry/beauty/items.item'" --gin "load_dataset.min_count = 1"
            --gin "load_item_embeddings.model = 'file:$WORK/carry/embeddings/beauty-minilm.npy'")
fi
ENV_JSON=$("$PY" - "$SMOKE" "$BUDGET_S" 2>> "$setup_log" <<'EOF'
import json, platform, subprocess, sys
env = {"smoke": sys.argv[1] == "1", "budget_s": int(sys.argv[2]), "python": platform.python_version()}
try:
    import torch
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    env["bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
except Exception as e:  # noqa: BLE001
    env["torch_error"] = repr(e)
try:
    import polars
    env["polars"] = polars.__version__
except Exception as e:  # noqa: BLE001
    env["polars_error"] = repr(e)
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    env["nvidia_smi"] = smi.stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
env["cpu"] = platform.processor() or platform.machine()
print(json.dumps(env))
EOF
) || ENV_JSON='{}'
[ -n "$ENV_JSON" ] || ENV_JSON='{}'
setup_took=$(minutes_since "$t0")
if [ "$setup_ok" = 1 ]; then
  record setup ok "$setup_took" "" "" "$ENV_JSON"
else
  FAILED=1
  record setup error "$setup_took" "" "$setup_log" "$ENV_JSON"
fi
STAGE_MINUTES+=("setup=$setup_took $([ "$setup_ok" = 1 ] && echo ok || echo error)")

# ---------------------------------------------------------------------------------- stages
# Per stage: the recipe, the GPU settings, and (--smoke) a tiny recipe on top with the fixture.
H200=bench/configs/gpu_h200.gin
OUTDIRS=(--gin "RQVAE_DIR = '$RUNS/rqvae'")
if [ "$SMOKE" = 1 ]; then
  TINY_RQVAE=(configs/tiny/rqvae_tiny.gin)
  TINY_DECODER=(configs/tiny/decoder_tiny.gin)
  TINY_SASREC=(configs/tiny/sasrec_tiny.gin --gin "train_decoder.max_steps = 60" --gin "train_decoder.eval_every = 30")
  TINY_ACTIONPIECE=(configs/tiny/actionpiece_tiny.gin)
else
  TINY_RQVAE=() TINY_DECODER=() TINY_SASREC=() TINY_ACTIONPIECE=()
fi
# run_stage's numbers: minutes planned, the least worth running, seconds beside training (start,
# data, the test on every user; guesses for an H200), seconds kept for the stages after it.
if [ "$setup_ok" = 1 ]; then
  if wants rqvae; then
    # No max_train_minutes in train_rqvae.py: 3,000 steps (cpu_rqvae.gin), guessed under a minute.
    run_stage rqvae 0 0 30 0 - train_rqvae.py configs/rqvae_amazon.gin bench/configs/cpu_rqvae.gin "$H200" \
      "${TINY_RQVAE[@]}" "${DATA_GIN[@]}" "${OUTDIRS[@]}" --gin "train_rqvae.out_dir = '$RUNS/rqvae'"
  fi
  tokenizer_ok=$([ "${STATUS_rqvae:-}" = ok ] || [ -f "$RUNS/rqvae/tokenizer/config.json" ] && echo 1 || echo 0)
  # Room kept for the least of sasrec (0.5 min + 40 s) and gpt (0.5 min + 60 s) while tiger trains.
  reserve_sasrec=$(wants sasrec && echo 70 || echo 0)
  reserve_gpt=$(wants gpt && [ "$tokenizer_ok" = 1 ] && echo 90 || echo 0)
  if wants tiger; then
    if [ "$tokenizer_ok" = 1 ]; then
      run_stage tiger 2.5 1.0 75 $((reserve_sasrec + reserve_gpt)) train_decoder train_decoder.py configs/decoder_amazon.gin "$H200" \
        bench/configs/gpu_decoder.gin "${TINY_DECODER[@]}" "${DATA_GIN[@]}" "${OUTDIRS[@]}" \
        --gin "train_decoder.out_dir = '$RUNS/tiger'"
    else
      record tiger skipped 0 "" "" '{"reason": "no tokenizer (rqvae failed)"}'
      STAGE_MINUTES+=("tiger=0 skipped")
    fi
  fi
  if wants sasrec; then
    run_stage sasrec 1.0 0.5 40 "$reserve_gpt" train_decoder train_decoder.py configs/sasrec_amazon.gin "$H200" \
      "${TINY_SASREC[@]}" "${DATA_GIN[@]}" --gin "train_decoder.out_dir = '$RUNS/sasrec'"
  fi
  if wants gpt; then
    if [ "$tokenizer_ok" = 1 ]; then
      run_stage gpt 1.5 0.5 60 0 train_decoder train_decoder.py configs/decoder_gpt_amazon.gin "$H200" \
        bench/configs/gpu_decoder.gin "${TINY_DECODER[@]}" "${DATA_GIN[@]}" "${OUTDIRS[@]}" \
        --gin "train_decoder.out_dir = '$RUNS/gpt'"
    else
      record gpt skipped 0 "" "" '{"reason": "no tokenizer (rqvae failed)"}'
      STAGE_MINUTES+=("gpt=0 skipped")
    fi
  fi
  if wants actionpiece; then
    run_stage actionpiece 1.5 1.0 150 0 train_actionpiece train_actionpiece.py configs/actionpiece_amazon.gin \
      "$H200" bench/configs/gpu_actionpiece.gin "${TINY_ACTIONPIECE[@]}" "${DATA_GIN[@]}" \
      --gin "train_actionpiece.out_dir = '$RUNS/actionpiece'"
  fi
fi

# ---------------------------------------------------------------------------------- summary
"$PY" - "$(minutes_since "$START")" "$BUDGET_S" "$ENV_JSON" "${STAGE_MINUTES[@]}" >> "$RESULTS" <<'EOF'
import json, sys
total, budget, env = float(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3] or "{}")
stages = {}
for item in sys.argv[4:]:
    name, rest = item.split("=", 1)
    minutes, status = rest.split(" ", 1)
    stages[name] = {"minutes": float(minutes), "status": status}
print(json.dumps({"stage": "summary", "total_minutes": total, "budget_minutes": round(budget / 60, 2),
                  "gpu": env.get("gpu"), "torch": env.get("torch"), "smoke": env.get("smoke"),
                  "stages": stages, "ok": all(s["status"] in ("ok", "skipped") for s in stages.values())}))
EOF
echo "[gpu_reproduce] done in $(minutes_since "$START") min: $RESULTS" >&2
cat "$RESULTS"
exit "$FAILED"
