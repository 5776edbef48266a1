#!/usr/bin/env bash
# Quick start on a laptop CPU, no downloads: write the digits dataset (32x32, 10 classes), train a
# small class-conditional diffusion model and a noisy classifier on 2 processes (mpiexec), then
# sample with DDIM (25 steps) with and without classifier guidance. Outputs (npz + PNG grids,
# checkpoints, logs) go to $OUT (default runs/quickstart).
#
#   bash scripts/quickstart.sh                 # a few minutes on 2 cores
#   STEPS=3000 CLS_STEPS=1000 bash scripts/quickstart.sh   # longer, better samples
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

OUT="${OUT:-runs/quickstart}"
STEPS="${STEPS:-300}"          # diffusion model training steps
CLS_STEPS="${CLS_STEPS:-150}"  # classifier training steps
NPROC="${NPROC:-2}"
NUM_SAMPLES="${NUM_SAMPLES:-64}"
mkdir -p "$OUT"

MODEL_FLAGS="--image_size 32 --num_channels 64 --num_res_blocks 1 --channel_mult 1,2,2
  --attention_resolutions 8 --num_head_channels 32 --learn_sigma True --class_cond True
  --num_classes 10"
DIFFUSION_FLAGS="--diffusion_steps 1000 --noise_schedule cosine"
CLASSIFIER_FLAGS="--classifier_width 32 --classifier_depth 1 --classifier_channel_mult 1,2,2
  --classifier_attention_resolutions 8 --num_classes 10"
SAMPLE_FLAGS="--num_samples $NUM_SAMPLES --batch_size 32 --timestep_respacing ddim25 --use_ddim True"

t0=$(date +%s)
echo "== 1/5 digits dataset"
python datasets/digits.py --out_dir "$OUT/digits" --image_size 32

echo "== 2/5 diffusion model: $STEPS steps on $NPROC processes"
mpiexec -n "$NPROC" python scripts/image_train.py --data_dir "$OUT/digits" $MODEL_FLAGS \
  $DIFFUSION_FLAGS --lr 5e-4 --batch_size 16 --ema_rate 0.995 --lr_anneal_steps "$STEPS" \
  --save_interval 1000000 --log_interval 50 --log_dir "$OUT/model"

echo "== 3/5 noisy classifier: $CLS_STEPS steps on $NPROC processes"
mpiexec -n "$NPROC" python scripts/classifier_train.py --data_dir "$OUT/digits" --image_size 32 \
  $CLASSIFIER_FLAGS $DIFFUSION_FLAGS --lr 1e-3 --batch_size 32 --iterations "$CLS_STEPS" \
  --save_interval 1000000 --log_interval 100 --log_dir "$OUT/classifier"

# A few hundred steps are far too few for an EMA to forget the initial weights (0.995^300 = 0.22
# of them remain, which gave pure noise), so short runs sample the raw weights.
MODEL="$OUT/model/model$(printf %06d "$STEPS").pt"
echo "== 4/5 DDIM samples without guidance"
mpiexec -n "$NPROC" python scripts/image_sample.py --model_path "$MODEL" $MODEL_FLAGS \
  $DIFFUSION_FLAGS $SAMPLE_FLAGS --log_dir "$OUT/samples"

echo "== 5/5 DDIM samples with classifier guidance"
mpiexec -n "$NPROC" python scripts/classifier_sample.py --model_path "$MODEL" $MODEL_FLAGS \
  $DIFFUSION_FLAGS $CLASSIFIER_FLAGS $SAMPLE_FLAGS --classifier_scale 2.0 \
  --classifier_path "$OUT/classifier/model$(printf %06d "$CLS_STEPS").pt" --log_dir "$OUT/guided"

echo "done in $(( $(date +%s) - t0 )) s:"
ls "$OUT"/samples/samples_*.png "$OUT"/guided/samples_*.png
