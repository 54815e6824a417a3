#!/usr/bin/env bash
# Train several synthfaces autoencoder variants side by side on one GPU (or CPU), each for a
# fixed wall-time budget, then export each one's last EMA weights (float16, with z statistics).
#
#   benchmarks/train_autoencoder_variants.sh RUN_DIR RESULT_DIR MINUTES DEVICE [FACES_NPZ]
#
# RUN_DIR holds each variant's run folder (checkpoints, log.jsonl; a rerun resumes them);
# RESULT_DIR receives one VARIANT.tar per variant (log.jsonl + the exported model folder) and
# console.log. EXTRA_ARGS (environment) adds train flags; PYTHON names the interpreter. FACES_NPZ: a faces cache written by `train_synthfaces` (default: drawn in RUN_DIR).
# The variants are a 2x2 of width (the synthfaces32 preset, 32 channels, vs 64) and the label
# path (assigned labels with 30% noise and 10% dropout, vs none): does the label path take the
# age out of z, and does width help z carry it?
set -euo pipefail
run_dir=$1 result_dir=$2 minutes=$3 device=$4 faces=${5:-} py=${PYTHON:-python3}
mkdir -p "$run_dir" "$result_dir"
common=(--device "$device" --threads 4 --batch-size 128 --lr 2e-4 --steps 1000000
        --log-every 4000 --max-minutes "$minutes" --no-pixel-probe)
[ -n "$faces" ] && common+=(--data-cache "$faces")
# shellcheck disable=SC2206  # EXTRA_ARGS: more train flags, e.g. a smaller probe for a smoke run
common+=(${EXTRA_ARGS:-})
declare -A variants=(
  [c32_cond]=''
  [c32_uncond]='--no-label-conditioning'
  [c64_cond]='--overrides {"model_channels":64}'
  [c64_uncond]='--overrides {"model_channels":64} --no-label-conditioning'
)
for name in "${!variants[@]}"; do
  # shellcheck disable=SC2086  # the variant's flags are words on purpose
  "$py" -m diffinf_ray.diffae.train_synthfaces train --out "$run_dir/$name" "${common[@]}" \
    ${variants[$name]} >"$run_dir/$name.out" 2>&1 &
done
wait || true
for name in "${!variants[@]}"; do
  step=$("$py" -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['step'])" "$run_dir/$name/log.jsonl")
  # shellcheck disable=SC2086
  "$py" -m diffinf_ray.diffae.train_synthfaces export --out "$run_dir/$name" --step "$step" \
    --dest "$run_dir/$name/export" --half --device "$device" ${faces:+--data-cache "$faces"} \
    ${variants[$name]} >>"$run_dir/$name.out" 2>&1
  tar -C "$run_dir" -cf "$result_dir/$name.tar" "$name/log.jsonl" "$name/export" "$name.out"
  tail -n 3 "$run_dir/$name.out" >>"$result_dir/console.log"
done
