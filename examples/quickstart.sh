#!/usr/bin/env bash
# The main job on a CPU in about a minute: build a tiny random-weight model of a family offline,
# then train it with SFT and DPO (LoRA on the language model, frozen vision tower) on the example
# data in examples/data/. Usage: bash examples/quickstart.sh [family] (any of `resonance models`; llava by
# default). Rows a family cannot take (PaliGemma needs an image in every row, InstructBLIP takes one)
# are skipped with a log line and a count.
set -euo pipefail
cd "$(dirname "$0")/.."
family="${1:-llava}"
out="outputs/quickstart-${family}"

resonance tiny "$family" "$out/base" --overwrite

resonance train sft \
  --model_name_or_path "$out/base" \
  --data_path examples/data/sft.jsonl \
  --output_dir "$out/sft" --overwrite_output_dir true \
  --lora_target_modules auto --freeze_vision_tower True \
  --per_device_train_batch_size 4 --learning_rate 5e-3 --num_train_epochs 2 \
  --logging_steps 2 --save_strategy no --report_to none --skip_invalid_rows True

resonance train dpo \
  --model_name_or_path "$out/base" \
  --data_path examples/data/dpo.jsonl \
  --output_dir "$out/dpo" --overwrite_output_dir true \
  --lora_target_modules auto --freeze_vision_tower True \
  --per_device_train_batch_size 4 --learning_rate 5e-3 --num_train_epochs 2 --beta 0.1 \
  --logging_steps 2 --save_strategy no --report_to none --skip_invalid_rows True

echo "Adapters and processors saved under $out/sft and $out/dpo"
