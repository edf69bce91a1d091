#!/usr/bin/env bash
# The DeepSpeed checks of issue 18, on a machine with (at least) two GPUs; the same checks run on CPU
# (DeepSpeed's CPU accelerator, gloo) with `pytest tests/test_deepspeed.py -m slow`.
#
# What it checks:
#   1. tests/test_deepspeed.py -m slow: two processes under ZeRO-2 train the weights and UW log-variances
#      of plain DDP (--multi_gpu) with an accumulation window of 2; a ZeRO-2 checkpoint resumes exactly;
#      ZeRO-3 with every parameter sharded trains DDP's weights and writes the gathered model.
#   2. the ready configs examples/accelerate/deepspeed_zero{2,3}.yaml, in bf16: train 4 steps with UW and
#      accumulation, checkpoint at 2, resume from it to step 6, write a diffusers folder.
#   3. bad input: that ZeRO checkpoint resumed without DeepSpeed is refused in one line, nothing overwritten.
#   4. train_scripts/check_engine_families.py: SDXL, SD3, Flux and Qwen-Image (LoRA, UW and UW + PCGrad) under
#      FSDP2, ZeRO-2 and ZeRO-3 against DDP, each resumed exactly (32 two-process runs).
#
#   bash train_scripts/check_engines.sh            # PYTHON=... NUM_PROCESSES=... to override
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NUM_PROCESSES=${NUM_PROCESSES:-2}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import deepspeed" || { echo "DeepSpeed is not installed: pip install deepspeed" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RUN=(--model_type unet --dataset_name mnist5k --model_config_name_or_path tiny --train_batch_size 8
     --num_clusters 4 --report_to none --seed 0 --num_validation_images 2 --num_inference_steps 2
     --max_train_samples 64 --mtl_method uw --gradient_accumulation_steps 2 --checkpointing_steps 2)

echo "== 1/4 pytest tests/test_deepspeed.py -m slow"
"$PYTHON" -m pytest tests/test_deepspeed.py -m slow -p no:cacheprovider -v

for stage in 2 3; do
  echo "== 2/4 ZeRO-$stage from examples/accelerate/deepspeed_zero$stage.yaml (bf16): train, resume, save"
  launch=("$PYTHON" -m accelerate.commands.launch --config_file "examples/accelerate/deepspeed_zero$stage.yaml"
          --num_processes "$NUM_PROCESSES" --mixed_precision bf16 --main_process_port 0 train_scripts/train_ant.py)
  out="$WORK/zero$stage"
  "${launch[@]}" "${RUN[@]}" --max_train_steps 4 --output_dir "$out"
  "${launch[@]}" "${RUN[@]}" --max_train_steps 6 --output_dir "$out" --resume_from_checkpoint checkpoint-2
  test -d "$out/checkpoint-6/pytorch_model" && test -f "$out/unet/diffusion_pytorch_model.safetensors"
done

echo "== 3/4 a ZeRO checkpoint resumed without DeepSpeed: one line, nothing written"
before=$(ls -lR --time-style=full-iso "$WORK/zero2" | md5sum)
if err=$("$PYTHON" train_scripts/train_ant.py "${RUN[@]}" --max_train_steps 8 --output_dir "$WORK/zero2" \
         --resume_from_checkpoint latest 2>&1 >/dev/null); then
  echo "FAILED: resuming a ZeRO checkpoint without DeepSpeed was not refused" >&2; exit 1
fi
echo "$err" | grep -q "DeepSpeed ZeRO checkpoint" || { echo "FAILED: unexpected error: $err" >&2; exit 1; }
[ "$(ls -lR --time-style=full-iso "$WORK/zero2" | md5sum)" = "$before" ] || { echo "FAILED: files changed" >&2; exit 1; }
echo "== 4/4 the four newer families under each engine against DDP, resumed exactly"
"$PYTHON" train_scripts/check_engine_families.py --output_dir "$WORK/families"
echo "all DeepSpeed checks passed"
