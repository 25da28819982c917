#!/usr/bin/env bash
# The equal-budget Beauty leaderboard (issue 21): every method trained for 60 minutes of one
# core's CPU time (bench/configs/cpu_60min*.gin: training_clock.kind = 'process', the cosine
# sized to the steps that fit; OMP_NUM_THREADS=1), tested on all users, each run in
# runs/leaderboard/<method> and its result copied to results/leaderboard/<method>.json (with
# <method>.ranks.npz beside it, for bench/compare_runs.py); then RESULTS.md and
# results/beauty_curves.png are regenerated (python bench/results_table.py).
#
#   bash bench/leaderboard.sh [METHOD ...]              # default: every method, in dependency order
#   bash bench/leaderboard.sh tokenizers                # only the tokenizers
#   LEADERBOARD_DRY_RUN=1 bash bench/leaderboard.sh     # print the commands, run nothing
#
# Methods: sasrec, tiger (T5 on the text RQ-VAE), tiger_sasrec (T5 on an RQ-VAE of SASRec's item
# embeddings), gpt (the README main job's 2-layer GPT), actionpiece (official scoring), etegrec
# (from the SASRec-embedding RQ-VAE, as the paper), recgpt, tiger_hidvae, rpg, and grpo (from
# the generative run with the best *validation* NDCG@10 among tiger, tiger_sasrec, tiger_hidvae
# and gpt, or LEADERBOARD_GRPO_FROM; its JSON names it as "started_from"; 60 CPU minutes of GRPO
# on top of that run's 60).
# Tokenizers (rqvae, hidvae, recgpt_fsq, opq32, and rqvae_sasrec after sasrec) are trained on their
# own schedules (bench/configs/cpu_rqvae.gin; OPQ has no training loop), outside the 60 minutes,
# and reported apart: results/leaderboard/tokenizers/<name>.json. A method's missing inputs are
# trained first; an input whose folder already holds a result.json is reused. A method named on
# the command line always runs (a finished run resumes from its checkpoint and is tested again).
#
# Environment: SIDREC_JOBS (default 1) is how many training jobs share the machine, recorded in
# each result's machine.jobs_sharing_machine (two runs at a time on a 2-core machine: start two
# invocations with SIDREC_JOBS=2, after `bash bench/leaderboard.sh tokenizers sasrec rqvae_sasrec`
# so that they do not both train a shared input). PYTHON (default python), LEADERBOARD_ROOT (the
# runs, default runs/leaderboard), LEADERBOARD_RESULTS (default results: the JSONs go to its
# leaderboard/ folder) and LEADERBOARD_TABLE (default RESULTS.md) are for tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
ROOT=${LEADERBOARD_ROOT:-runs/leaderboard}
RESULTS_DIR=${LEADERBOARD_RESULTS:-results}
RESULTS=$RESULTS_DIR/leaderboard
TABLE=${LEADERBOARD_TABLE:-RESULTS.md}
DRY=${LEADERBOARD_DRY_RUN:-0}
DATA=bench/configs/beauty_local.gin
export OMP_NUM_THREADS=1
export SIDREC_JOBS=${SIDREC_JOBS:-1}

TOKENIZERS=(rqvae hidvae recgpt_fsq opq32 rqvae_sasrec)
METHODS=(sasrec tiger tiger_sasrec gpt actionpiece etegrec recgpt tiger_hidvae rpg grpo)
# Dependency order: every step after the ones it reads.
ORDER=(rqvae hidvae recgpt_fsq opq32 sasrec rqvae_sasrec tiger tiger_sasrec gpt actionpiece etegrec recgpt
       tiger_hidvae rpg grpo)
GRPO_CANDIDATES=(tiger tiger_sasrec tiger_hidvae gpt)  # train_decoder.py T5 / GPT runs (what train_grpo.py takes)

is_tokenizer() { [[ " ${TOKENIZERS[*]} " == *" $1 "* ]]; }

grpo_start() {  # the method GRPO starts from: LEADERBOARD_GRPO_FROM, else the best on validation
    if [[ -n "${LEADERBOARD_GRPO_FROM:-}" ]]; then echo "$LEADERBOARD_GRPO_FROM"; return; fi
    "$PY" - "$RESULTS" "${GRPO_CANDIDATES[@]}" <<'EOF'
import json, sys
from pathlib import Path
folder, names = Path(sys.argv[1]), sys.argv[2:]
scores = {n: json.loads((folder / f"{n}.json").read_text())["valid"]["ndcg@10"]
          for n in names if (folder / f"{n}.json").is_file()}
print(max(scores, key=lambda n: (scores[n], -names.index(n))) if scores else names[0])
EOF
}

spec() {  # spec NAME: sets SCRIPT, ARGS (configs, then --gin bindings; out_dir last) and DEPS
    local n=$1
    DEPS=(); GRPO_FROM=
    case $n in
        rqvae) SCRIPT=train_rqvae.py; ARGS=(configs/rqvae_amazon.gin "$DATA" bench/configs/cpu_rqvae.gin) ;;
        rqvae_sasrec) SCRIPT=train_rqvae.py; DEPS=(sasrec)
            ARGS=(configs/rqvae_amazon.gin "$DATA" bench/configs/cpu_rqvae.gin
                  --gin "load_item_embeddings.model='sasrec:$ROOT/sasrec'") ;;
        hidvae) SCRIPT=train_rqvae.py  # the last step's codes, LC-Rec-rebalanced (the README's TIGER row)
            ARGS=(configs/hidvae_amazon.gin "$DATA" bench/configs/cpu_rqvae.gin
                  --gin "train_rqvae.select_by='last'" --gin "train_rqvae.rebalance_last_level=True") ;;
        recgpt_fsq) SCRIPT=train_rqvae.py; ARGS=(configs/recgpt_fsq_amazon.gin "$DATA" bench/configs/cpu_rqvae.gin) ;;
        opq32) SCRIPT=train_rqvae.py; ARGS=(configs/opq_amazon.gin "$DATA") ;;
        sasrec) SCRIPT=train_decoder.py; ARGS=(configs/sasrec_amazon.gin "$DATA" bench/configs/cpu_60min_sasrec.gin) ;;
        tiger|tiger_sasrec|tiger_hidvae)
            local tok=${n/tiger_/}; [[ $n == tiger ]] && tok=rqvae; [[ $tok == sasrec ]] && tok=rqvae_sasrec
            SCRIPT=train_decoder.py; DEPS=("$tok")
            ARGS=(configs/decoder_amazon.gin "$DATA" bench/configs/cpu_60min_decoder.gin --gin "RQVAE_DIR='$ROOT/$tok'") ;;
        gpt) SCRIPT=train_decoder.py; DEPS=(rqvae)
            ARGS=(configs/decoder_gpt_amazon.gin "$DATA" bench/configs/cpu_60min_gpt.gin --gin "RQVAE_DIR='$ROOT/rqvae'") ;;
        recgpt) SCRIPT=train_decoder.py; DEPS=(recgpt_fsq)
            ARGS=(configs/recgpt_amazon.gin "$DATA" bench/configs/cpu_60min_recgpt.gin
                  --gin "train_decoder.tokenizer='$ROOT/recgpt_fsq'") ;;
        rpg) SCRIPT=train_decoder.py; DEPS=(opq32)
            ARGS=(configs/rpg_amazon.gin "$DATA" bench/configs/cpu_60min_rpg.gin --gin "train_decoder.tokenizer='$ROOT/opq32'") ;;
        actionpiece) SCRIPT=train_actionpiece.py
            ARGS=(configs/actionpiece_amazon.gin "$DATA" bench/configs/cpu_60min_actionpiece.gin) ;;
        etegrec) SCRIPT=train_joint.py; DEPS=(sasrec rqvae_sasrec)  # the tokenizer's input: SASRec's item table
            ARGS=(configs/etegrec_amazon.gin "$DATA" bench/configs/cpu_60min_joint.gin
                  --gin "RQVAE_DIR='$ROOT/rqvae_sasrec'" --gin "load_item_embeddings.model='sasrec:$ROOT/sasrec'") ;;
        grpo)
            local from configs=() bindings=() a
            from=$(grpo_start)
            [[ " ${GRPO_CANDIDATES[*]} " == *" $from "* ]] || { echo "LEADERBOARD_GRPO_FROM=$from: GRPO starts from one of ${GRPO_CANDIDATES[*]}" >&2; exit 2; }
            spec "$from"  # its recipe gives the data settings (configs first, then its bindings but its out_dir); the model comes from its record
            for a in "${ARGS[@]}"; do [[ $a == *.gin && $a != *=* ]] && configs+=("$a"); done
            for ((i = 0; i < ${#ARGS[@]}; i++)); do
                [[ ${ARGS[i]} == --gin && ${ARGS[i+1]} != *.out_dir=* ]] && bindings+=(--gin "${ARGS[i+1]}")
            done
            GRPO_FROM=$from; SCRIPT=train_grpo.py; DEPS=("$from")
            ARGS=(configs/grpo_amazon.gin "${configs[@]}" bench/configs/cpu_60min_grpo.gin "${bindings[@]}"
                  --gin "train_grpo.sft_dir='$ROOT/$from'") ;;
        *) echo "unknown method '$n' (methods: ${METHODS[*]}; tokenizers: ${TOKENIZERS[*]}; or 'tokenizers')" >&2; exit 2 ;;
    esac
    ARGS+=(--gin "${SCRIPT%.py}.out_dir='$ROOT/$n'")
}

shown() {  # the command as one pasteable line
    local line="OMP_NUM_THREADS=1 SIDREC_JOBS=$SIDREC_JOBS $PY $SCRIPT" a
    for a in "${ARGS[@]}"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then line+=" $a"; else line+=" \"$a\""; fi
    done
    echo "$line"
}

# ---- what to run: the named steps and the inputs they miss, in dependency order
requested=()
for a in "${@:-all}"; do
    case $a in
        all) requested+=("${TOKENIZERS[@]}" "${METHODS[@]}") ;;
        tokenizers) requested+=("${TOKENIZERS[@]}") ;;
        *) spec "$a"; requested+=("$a") ;;
    esac
done
declare -A wanted=()
want() {
    local n=$1 d deps
    [[ -n "${wanted[$n]:-}" ]] && return
    wanted[$n]=1
    spec "$n"; deps=("${DEPS[@]}")
    for d in "${deps[@]}"; do
        [[ -f "$ROOT/$d/result.json" ]] || want "$d"
    done
}
for n in "${requested[@]}"; do want "$n"; done

[[ $DRY == 1 ]] && echo "# dry run: the commands bench/leaderboard.sh would run, in order"
for n in "${ORDER[@]}"; do
    [[ -n "${wanted[$n]:-}" ]] || continue
    spec "$n"  # (grpo: its start is chosen now, after the runs above)
    if is_tokenizer "$n"; then dest="$RESULTS/tokenizers/$n.json"; else dest="$RESULTS/$n.json"; fi
    if [[ $DRY == 1 ]]; then
        echo "# $n -> $dest${GRPO_FROM:+ (started_from: $GRPO_FROM)}"
        shown
        continue
    fi
    mkdir -p "$ROOT" "$(dirname "$dest")"
    echo "[leaderboard] $n: $(shown)" >&2
    "$PY" "$SCRIPT" "${ARGS[@]}" 2>&1 | tee "$ROOT/$n.log"
    src="$ROOT/$n/result.json"
    [[ -f "$src" ]] || { echo "[leaderboard] $n wrote no $src (see $ROOT/$n.log)" >&2; exit 1; }
    if [[ $n == grpo ]]; then
        "$PY" - "$src" "$dest" "$GRPO_FROM" <<'EOF'
import json, sys
record = json.loads(open(sys.argv[1]).read())
record["started_from"] = sys.argv[3]
open(sys.argv[2], "w").write(json.dumps(record, indent=1) + "\n")
EOF
    else
        cp "$src" "$dest"
    fi
    if [[ -f "$ROOT/$n/result.ranks.npz" ]]; then cp "$ROOT/$n/result.ranks.npz" "${dest%.json}.ranks.npz"; fi
    echo "[leaderboard] $n -> $dest" >&2
done
[[ $DRY == 1 ]] || "$PY" bench/results_table.py --results "$RESULTS_DIR" --out "$TABLE"
