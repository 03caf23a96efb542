#!/usr/bin/env bash
# Every GPU benchmark of issue 7, each phase under its own time limit, most important first.
#   OUT=results/ UPSTREAM=upstream/ bash tests/benchmarks/gpu_suite.sh
#   PHASES="decoder sampling_d16" OUT=... bash tests/benchmarks/gpu_suite.sh   # some phases only (one device call each)
#   SMOKE=1 OUT=/tmp/suite bash tests/benchmarks/gpu_suite.sh     # tiny models on the CPU: checks the script itself
# Phases and limits: draw_check 60 s (the draw and the sampler checks), decoder 150 s (a cold compile of the decoder), sampling_d16 240 s,
# sampling_d30 180 s, training_d16 200 s, training_d30_memory 70 s (only with MEMORY=1): at most 13-14 minutes in all,
# so on a 10-minute device call run it in two (PHASES="draw_check decoder sampling_d16" — at most 7.5 minutes —, then
# PHASES="sampling_d30 training_d16").
# sampling_d30 calls ours as the contract does (a CPU generator, torch.Generator().manual_seed(seed), and PIL images),
# sampling_d16 with a generator on the GPU and tensors out. Needs an upstream checkout (FoundationVision/VAR, never committed) at $UPSTREAM. Results: $OUT/*.json, logs, profiles.
set -uo pipefail
OUT=${OUT:-bench-out}; UPSTREAM=${UPSTREAM:-upstream}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=tests/benchmarks
S=(); T=(); D=()  # overrides of the sampling / training arguments (argparse keeps the last occurrence)
V=()  # overrides of the decoder benchmark
if [[ "${SMOKE:-0}" == 1 ]]; then S=(--depth 2 --batch-sizes 2 1 --device cpu --repeats 1); T=(--depth 2 --batch-size 2 --device cpu --steps 1); D=(--device cpu --trials 4); V=(--batch-size 2 --device cpu --repeats 1); fi
PHASES=${PHASES:-"draw_check decoder sampling_d16 sampling_d30 training_d16 training_d30_memory"}
phase() {  # phase NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  [[ " $PHASES " == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s) $(date +%T)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/phase.log" 2>&1; local rc=$?
  { echo "=== $name"; cat "$OUT/phase.log"; } >> "$OUT/suite.log"
  grep -v "Warning\|warn(\|^  \|autocast\|^\s*$" "$OUT/phase.log" | tail -n 40; rm -f "$OUT/phase.log"
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, transformers, diffusers, accelerate; print(torch.__version__, transformers.__version__, diffusers.__version__, accelerate.__version__)"
phase draw_check 60 python3 $B/check_sampling_draw.py "${D[@]}"
phase decoder 150 python3 $B/bench_decoder.py --batch-size 64 --dtype bf16 --upstream "$UPSTREAM" --repeats 5 \
  --profile "$OUT/profile_decoder" --output "$OUT/decoder.json" "${V[@]}"
phase sampling_d16 240 python3 $B/bench_sampling.py --depth 16 --batch-sizes 64 1 --dtype bf16 --upstream "$UPSTREAM" \
  --variants eager compiled float8 --repeats 5 --warmup 2 --profile "$OUT/profile_d16" --output "$OUT/sampling_d16.json" "${S[@]}"
phase sampling_d30 180 python3 $B/bench_sampling.py --depth 30 --batch-sizes 64 --dtype bf16 --upstream "$UPSTREAM" \
  --variants compiled float8 --repeats 3 --warmup 1 --generator cpu --output-type pil --profile "$OUT/profile_d30" --output "$OUT/sampling_d30.json" "${S[@]}"
phase training_d16 200 python3 $B/bench_training.py --depth 16 --batch-size 32 --dtype bf16 --upstream "$UPSTREAM" \
  --upstream-with-tokenizer --compile --steps 6 --warmup 2 --output "$OUT/training_d16.json" "${T[@]}"
if [[ "${MEMORY:-0}" == 1 ]]; then
phase training_d30_memory 70 python3 $B/bench_training.py --depth 30 --batch-size 32 --dtype bf16 --gradient-checkpointing \
  --steps 2 --warmup 1 --output "$OUT/training_d30_memory.json" "${T[@]}"
fi
