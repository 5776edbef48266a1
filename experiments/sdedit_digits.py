"""
SDEdit on real digits, guided towards another class: how the class of an edited digit moves
from its own (source) class to a target class as the edit strength grows, judged by a classifier
trained on the real digits (guidance_eval.RealDigitsJudge, independent of the guiding one).

The inputs are the judge's held-out real digits (the last 20% of the bundled digits at 8x8);
each is edited towards target = (source + 1) mod 10 by classifier guidance (the noisy classifier
of classifier_train.py, gradient scale --classifier_scale) and, for reference, without guidance.
The models are those of scripts/quickstart.sh (8x8 grey digits, unconditional model, cosine
schedule, T = 1000):

    python datasets/digits.py --out_dir runs/sdedit/digits --image_size 8
    python scripts/image_train.py --data_dir runs/sdedit/digits $MODEL_FLAGS $DIFFUSION_FLAGS \
        --lr 2e-3 --batch_size 64 --ema_rate 0.99 --lr_anneal_steps 2000 --log_dir runs/sdedit/model
    python scripts/classifier_train.py --data_dir runs/sdedit/digits --image_size 8 \
        $CLASSIFIER_FLAGS $DIFFUSION_FLAGS --lr 1e-3 --batch_size 64 --iterations 2000 \
        --log_dir runs/sdedit/classifier
    python experiments/sdedit_digits.py --model_path runs/sdedit/model/ema_0.99_002000.pt \
        --classifier_path runs/sdedit/classifier/model002000.pt --out_dir runs/sdedit

Writes sdedit_digits.json, sdedit_digits.md (the table) and sdedit_digits.png (rows: the input,
then one row per strength, guided).
"""

import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from experiment_files import write_results  # noqa: E402
from guidance_eval import RealDigitsJudge  # noqa: E402

from guided_diffusion.diffusion.sdedit import sdedit_loop  # noqa: E402
from guided_diffusion.sampling.editing import guided_model  # noqa: E402
from guided_diffusion.sampling.files import make_grid_png, to_uint8, uint8_to_model_input  # noqa: E402
from guided_diffusion.script_util import create_classifier, create_model_and_diffusion  # noqa: E402
from guided_diffusion.cli.main import run_main  # noqa: E402
from guided_diffusion.script_util import script_parser  # noqa: E402

# The quick start's flags (scripts/quickstart.sh).
MODEL_FLAGS = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                   attention_resolutions="4", num_head_channels=32, class_cond=False,
                   diffusion_steps=1000, noise_schedule="cosine")
CLASSIFIER_FLAGS = dict(image_size=8, classifier_use_fp16=False, classifier_width=32,
                        classifier_depth=1, classifier_attention_resolutions="4",
                        classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                        classifier_pool="attention", num_classes=10,
                        classifier_channel_mult="1,2")


def load_models(model_path, classifier_path, respacing):
    from guided_diffusion.script_util import model_and_diffusion_defaults

    flags = model_and_diffusion_defaults()
    flags.update(MODEL_FLAGS, timestep_respacing=respacing)
    model, diffusion = create_model_and_diffusion(**flags)
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    classifier = create_classifier(**CLASSIFIER_FLAGS)
    classifier.load_state_dict(torch.load(classifier_path, map_location="cpu", weights_only=True))
    return model.eval(), diffusion, classifier.eval()


def run(model_path, classifier_path, *, strengths, scales, num_inputs, respacing, seed,
        judge_steps, log=print):
    judge = RealDigitsJudge(8, steps=judge_steps, seed=seed)
    split = int(0.8 * len(judge.real_u8))
    inputs = judge.real_u8[split:][:num_inputs].repeat(3, axis=-1)  # grey -> RGB, as written
    source = judge.real_labels[split:][:num_inputs]
    target = (source + 1) % 10
    model, diffusion, classifier = load_models(model_path, classifier_path, respacing)
    x_start = uint8_to_model_input(inputs)
    y = torch.from_numpy(target).long()
    rows, guided_rows = [], []
    log(f"judge: {judge.heldout_accuracy:.3f} accuracy on held-out real digits; on the inputs "
        f"{np.mean(judge.predict(inputs) == source):.3f}")
    for scale in scales:
        # As image_edit.py guides an unconditional model: the labels reach the classifier only.
        model_fn, cond_fn = guided_model(model, class_cond=False, guidance_scale=1.0,
                                         num_classes=10, classifier=classifier if scale else None,
                                         classifier_scale=scale)
        for strength in strengths:
            torch.manual_seed(seed)
            start = time.time()
            edited = sdedit_loop(diffusion, model_fn, x_start, strength=strength, sampler="ddim",
                                 cond_fn=cond_fn, model_kwargs={"y": y})
            images = to_uint8(edited).numpy()
            predicted = judge.predict(images)
            row = dict(classifier_scale=scale, strength=strength,
                       target=float(np.mean(predicted == target)),
                       source=float(np.mean(predicted == source)),
                       change=float(np.abs(images.astype(int) - inputs).mean()),
                       seconds=round(time.time() - start, 1))
            rows.append(row)
            log(json.dumps(row))
            if scale == max(scales):
                guided_rows.append(images[:16])
    return dict(rows=rows, judge_heldout_accuracy=judge.heldout_accuracy,
                input_source_accuracy=float(np.mean(judge.predict(inputs) == source)),
                num_inputs=len(inputs), respacing=respacing), inputs[:16], guided_rows


def report(result):
    strengths = sorted({r["strength"] for r in result["rows"]})
    lines = [f"SDEdit of {result['num_inputs']} held-out real digits towards target = (source + 1) "
             f"mod 10 (DDIM, --timestep_respacing {result['respacing']}); fraction judged the "
             "target class / the source class, and the mean change in grey levels (0-255):\n",
             "| classifier scale | " + " | ".join(f"strength {s:g}" for s in strengths) + " |",
             "|---|" + "---|" * len(strengths)]
    for scale in sorted({r["classifier_scale"] for r in result["rows"]}):
        cells = []
        for s in strengths:
            r = next(r for r in result["rows"] if r["classifier_scale"] == scale
                     and r["strength"] == s)
            cells.append(f"{r['target']:.2f} / {r['source']:.2f} ({r['change']:.0f})")
        name = "0 (unguided)" if scale == 0 else f"{scale:g}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nThe judge: {result['judge_heldout_accuracy']:.3f} accuracy on held-out real "
                 f"digits, {result['input_source_accuracy']:.3f} on these inputs.")
    return "\n".join(lines) + "\n"


def create_argparser():
    return script_parser("SDEdit class shift on the digits.", dict(
        model_path="", classifier_path="", out_dir="runs/sdedit", strengths="0.2,0.4,0.6,0.8,1.0",
        classifier_scales="0,30", num_inputs=200, timestep_respacing="ddim50", judge_steps=1000,
        seed=0))


def main(argv=None):
    args = create_argparser().parse_args(argv)
    result, inputs, guided = run(
        args.model_path, args.classifier_path,
        strengths=[float(s) for s in args.strengths.split(",")],
        scales=[float(s) for s in args.classifier_scales.split(",")],
        num_inputs=args.num_inputs, respacing=args.timestep_respacing, seed=args.seed,
        judge_steps=args.judge_steps)
    write_results(args.out_dir, "sdedit_digits", result, report(result))
    grid = np.concatenate([inputs] + guided)
    big = grid.repeat(4, axis=1).repeat(4, axis=2)
    make_grid_png(big, os.path.join(args.out_dir, "sdedit_digits.png"), nrow=len(inputs))


if __name__ == "__main__":
    run_main(main)
