#!/usr/bin/env bash
# The benchmarks behind the README's one-H100 figures (benchmarks/h100/); then
#   python scripts/project_research.py --measured OUT_DIR
#
#   bash scripts/bench_h100.sh [OUT_DIR] [gpu|cpu|all]      # default: benchmarks/h100 all
#
# gpu: training tokens/s + MFU (random Llama-3.2-1B shape, bf16; SmolLM2 shape with a Qwen2-sized
#      vocabulary for the three training stages), evaluation throughput; cpu: tokenization, fastText,
#      corpus, term mining and alignment rates on this machine's cores. Each writes JSON to OUT_DIR;
#      scripts/project_research.py reads them. A failed benchmark is reported and the rest still run.
set -uo pipefail
out=${1:-benchmarks/h100}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
assets=${TOKALIGN_ASSETS:-../shared/assets}
src_tok=${SOURCE_TOKENIZER:-$assets/models/SmolLM2-135M-Instruct.Q4_1.gguf}
tgt_tok=${TARGET_TOKENIZER:-$assets/tokenizers/ggml-vocab-qwen2.gguf}
failed=()
run() { echo; echo "### $*"; "$@" || failed+=("$*"); }

if [[ $part == gpu || $part == all ]]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
  common=(--seq-len 2048 --micro-batch 8 --grad-accum 4 --peak-flops 989e12)
  # eager Llama-1B needs micro-batch 4 (8 ran out of memory on 80 GB); the global batch stays 64k tokens
  run python scripts/bench_train.py --model llama-1b --stages stage2 --seq-len 2048 --micro-batch 4 --grad-accum 8 \
      --steps 6 --warmup-steps 2 --out "$out/train_llama1b_eager_mb4.json"
  run python scripts/bench_train.py --model llama-1b --stages stage2 "${common[@]}" --steps 6 --warmup-steps 3 \
      --compile --out "$out/train_llama1b_compile.json"
  run python scripts/bench_train.py --vocab-size 151936 --stages stage1,stage2,stage2_lora "${common[@]}" \
      --steps 8 --warmup-steps 2 --out "$out/train_eager.json"
  run python scripts/bench_train.py --vocab-size 151936 --stages stage1,stage2,stage2_lora "${common[@]}" \
      --steps 8 --warmup-steps 3 --compile --out "$out/train_compile.json"
  run python scripts/bench_eval.py --tokenizer "$tgt_tok" --docs 400 --questions 200 --seq-len 2048 --stride 1024 \
      --batch-size 8 --out "$out/eval.json"
fi
if [[ $part == cpu || $part == all ]]; then
  n=$(nproc)
  echo "tokenize/fastText/align on $n cores"
  run python scripts/bench_upstream.py --source "$src_tok" --target "$tgt_tok" --workers 1 2 4 8 $n \
      --threads 1 4 $n --mb 32 --ft-mb 6 --ft-dim 300 --out "$out/upstream.json"
  run python scripts/bench_align.py --sizes 152064 --scorings csls --dim 300 --pivots 1000 --out "$out/align.json"
fi
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
