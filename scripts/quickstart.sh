#!/usr/bin/env bash
# Quick start, no downloads: the paper's classifier guidance on scikit-learn's bundled digits.
#  1. write the digits (8x8 grey, their native size, 10 classes) as an image folder;
#  2. train a small UNCONDITIONAL diffusion model and 3. a noisy classifier (mpiexec, NPROC ranks);
#  4. sample 100 digits with DDIM-100 without guidance and 5. with classifier guidance, from the same
#     noise and the same requested classes (classifier_sample.py at scale 0 and at $SCALE);
#  6. judge both with a classifier trained on the real digits (experiments/digits_report.py): the class
#     accuracy of each grid, and grids with one row per requested class.
# Unguided, an unconditional model ignores the requested class (accuracy near chance, 0.1); with
# guidance the same noise turns into the requested digits. Outputs go to $OUT (runs/quickstart).
#
#   bash scripts/quickstart.sh                       # 2-core CPU: see README for the measured time
#   STEPS=8000 CLS_STEPS=4000 bash scripts/quickstart.sh   # longer training
# On a GPU (torch.cuda.is_available()) it runs one process and trains 4x longer by default.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=gpu; DEF_NPROC=1; DEF_STEPS=16000; DEF_CLS_STEPS=8000
else
  DEVICE=cpu; DEF_NPROC=2; DEF_STEPS=4000; DEF_CLS_STEPS=2000
fi
OUT="${OUT:-runs/quickstart}"
STEPS="${STEPS:-$DEF_STEPS}"              # diffusion model training steps
CLS_STEPS="${CLS_STEPS:-$DEF_CLS_STEPS}"  # noisy classifier training steps
NPROC="${NPROC:-$DEF_NPROC}"
SCALE="${SCALE:-30}"                      # classifier guidance scale
NUM_SAMPLES="${NUM_SAMPLES:-100}"
BATCH=$(( 64 / NPROC ))                   # per rank, 64 images per step in all
mkdir -p "$OUT"

MODEL_FLAGS="--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2
  --attention_resolutions 4 --num_head_channels 32 --class_cond False"
DIFFUSION_FLAGS="--diffusion_steps 1000 --noise_schedule cosine"
CLASSIFIER_FLAGS="--classifier_width 32 --classifier_depth 1 --classifier_channel_mult 1,2
  --classifier_attention_resolutions 4 --num_classes 10"
SAMPLE_FLAGS="--num_samples $NUM_SAMPLES --batch_size $(( (NUM_SAMPLES + NPROC - 1) / NPROC ))
  --timestep_respacing ddim100 --use_ddim True --seed 0"

t0=$(date +%s)
echo "== 1/6 digits dataset (8x8) [$DEVICE, $NPROC processes]"
python datasets/digits.py --out_dir "$OUT/digits" --image_size 8

echo "== 2/6 unconditional diffusion model: $STEPS steps"
mpiexec -n "$NPROC" python scripts/image_train.py --data_dir "$OUT/digits" $MODEL_FLAGS \
  $DIFFUSION_FLAGS --lr 2e-3 --batch_size "$BATCH" --ema_rate 0.99 --lr_anneal_steps "$STEPS" \
  --save_interval 1000000 --log_interval 250 --log_dir "$OUT/model"

echo "== 3/6 noisy classifier: $CLS_STEPS steps"
mpiexec -n "$NPROC" python scripts/classifier_train.py --data_dir "$OUT/digits" --image_size 8 \
  $CLASSIFIER_FLAGS $DIFFUSION_FLAGS --lr 1e-3 --batch_size "$BATCH" --iterations "$CLS_STEPS" \
  --save_interval 1000000 --log_interval 100 --log_dir "$OUT/classifier"

# The EMA (rate 0.99: about the last 100 steps) is sampled, not the raw weights.
MODEL="$OUT/model/ema_0.99_$(printf %06d "$STEPS").pt"
CLASSIFIER="$OUT/classifier/model$(printf %06d "$CLS_STEPS").pt"
for step in unguided guided; do
  if [ "$step" = unguided ]; then scale=0; n=4; else scale="$SCALE"; n=5; fi
  echo "== $n/6 DDIM-100 samples, classifier scale $scale ($step)"
  mpiexec -n "$NPROC" python scripts/classifier_sample.py --model_path "$MODEL" $MODEL_FLAGS \
    $DIFFUSION_FLAGS $CLASSIFIER_FLAGS $SAMPLE_FLAGS --classifier_path "$CLASSIFIER" \
    --classifier_scale "$scale" --log_dir "$OUT/$step" --overwrite True  # a rerun retrains
done

echo "== 6/6 class accuracy under a classifier trained on the real digits"
NPZ="samples_${NUM_SAMPLES}x8x8x3.npz"
python experiments/digits_report.py "$OUT/unguided/$NPZ" "$OUT/guided/$NPZ"
echo "done in $(( $(date +%s) - t0 )) s; sample grids (in sampling order):"
ls "$OUT"/unguided/samples_*.png "$OUT"/guided/samples_*.png
