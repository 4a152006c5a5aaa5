#!/usr/bin/env bash
# The ECG ablation runs (issue 22): arms x record splits 0-2, 30 epochs each, two at a time,
# one thread each, in order of priority (the arms that only new runs can give come first:
# frozen time constants, RELU). The adaptive "all" and LIF arms also exist as the 100-epoch
# runs ecg4_ad_ds* / ecg3_srnn_ds* (same configuration; the report reads them --at-epoch 30).
# Usage: bash results/ablation/run_ecg.sh DATA_DIR [PYTHON]
set -u
DATA=${1:?data dir}; PY=${2:-python}
CFG="--task ecg --readout membrane --surrogate multi_gaussian --filter bandpass --threshold 0.1 --context 300 --augment 4 --batch-size 16 --ema 0.998 --grad-clip 1.0 --epochs 30 --lr-step 25 --val-fraction 0.2 --threads 1 --quiet --data-dir $DATA"
declare -A ARMS=(
  [ad_all]="--model adaptive" [ad_m]="--model adaptive --train-tau m" [ad_adp]="--model adaptive --train-tau adp"
  [ad_none]="--model adaptive --train-tau none" [lif]="--model lif" [relu]="--model relu"
  [ad16]="--model adaptive --hidden-sizes 16" [ad64]="--model adaptive --hidden-sizes 64")
ORDER="ad_none ad_m ad_adp relu ad_all ad16 ad64 lif"
jobs_list=()
for arm in $ORDER; do for ds in 0 1 2; do jobs_list+=("$arm $ds"); done; done
run_one() {
  local arm=$1 ds=$2 out=results/runs/abl_${1}_ds$2
  $PY -c "import json,sys; m=json.load(open('$out/metrics.json')); sys.exit(len(m['epochs']) < 30)" 2>/dev/null && return
  if [ -f $out/last.pt ]; then
    OMP_NUM_THREADS=1 $PY -m srnn_fast.train --resume $out --quiet > $out.log 2>&1
  else
    OMP_NUM_THREADS=1 $PY -m srnn_fast.train $CFG ${ARMS[$arm]} --data-seed $ds --out $out > $out.log 2>&1
  fi
  echo "$(date +%T) done $arm ds$ds rc=$?"
}
running() { pgrep -f "srnn_fast.train.*--out results/runs/abl_$1_ds$2\$" > /dev/null; }
for job in "${jobs_list[@]}"; do
  running $job && continue  # already training (a queue restarted beside its runs)
  while [ "$(pgrep -f 'srnn_fast.train.*abl_' | wc -l)" -ge 2 ]; do sleep 5; done
  run_one $job &
  sleep 20  # until its trainer shows up in pgrep
done
wait
