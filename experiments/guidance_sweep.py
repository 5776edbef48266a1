"""
The guidance-scale sweep of Dhariwal & Nichol 2021 (Figures 4-5, Table 4) on the bundled digits:
sample a class-conditional and/or an unconditional diffusion model with classifier guidance at
several scales (same seeds and requested classes at every scale) and judge the samples with a
classifier trained on the real digits: fidelity (class accuracy, precision) against diversity
(recall, within-class feature spread) and FID on that classifier's features.

    python experiments/guidance_sweep.py --cond_model_path cond/ema.pt --uncond_model_path uncond/ema.pt \
        --classifier_path classifier/model000400.pt $MODEL_FLAGS $CLASSIFIER_FLAGS \
        --scales 0,0.5,1,2,5,10 --num_samples 500 --out_dir runs/sweep

Writes to --out_dir: sweep.json (the table), sweep.png (each metric against the scale, one line
per model) and grids/<model>_scale<s>.png (one row per requested class).
"""

import json
import os
import time

import torch
from PIL import Image

from guided_diffusion import dist_util, logger
from guidance_eval import RealDigitsJudge, grid_by_class
from guided_diffusion.sampling.files import to_uint8
from guided_diffusion.cli.weights import load_checkpoint_into
from guided_diffusion.diffusion.guidance import make_classifier_cond_fn
from guided_diffusion.cli.main import run_main
from guided_diffusion.script_util import (
    args_to_dict,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    script_parser,
)

METRICS = ("accuracy", "precision", "recall", "spread", "fid")


def parse_scales(text):
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers like 0,1,10, got {text!r}") from None
    if not scales or any(s < 0 for s in scales):
        raise ValueError(f"--scales needs at least one scale, none negative, got {text!r}")
    return scales


def load_diffusion_model(args, path, class_cond):
    keys = [k for k in model_and_diffusion_defaults() if k != "class_cond"]
    flags = args_to_dict(args, keys)
    flags.update(class_cond=class_cond, num_classes=args.num_classes)
    model, diffusion = create_model_and_diffusion(**flags)
    load_checkpoint_into(model, path, flags, build=lambda f: create_model_and_diffusion(**f)[0])
    return model.to(dist_util.dev()).eval(), diffusion


def load_guiding_classifier(args):
    flags = args_to_dict(args, classifier_defaults().keys())
    flags.update(num_classes=args.num_classes, classifier_channel_mult=args.classifier_channel_mult)
    classifier = create_classifier(**flags)
    load_checkpoint_into(classifier, args.classifier_path, flags, build=lambda f: create_classifier(**f))
    return classifier.to(dist_util.dev()).eval()


def sample(model, diffusion, *, class_cond, cond_fn, args):
    """
    :return: (uint8 [N, H, W, 3], int64 [N] requested classes); the same noise and classes for
        every call with the same args (classes cycle 0..num_classes-1).
    """
    labels = torch.arange(args.num_samples) % args.num_classes
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(
        args.num_samples, 3, args.image_size, args.image_size, generator=gen
    )

    def model_fn(x, t, y=None):
        return model(x, t, y if class_cond else None)

    sample_fn = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    out = []
    for start in range(0, args.num_samples, args.batch_size):
        y = labels[start : start + args.batch_size].to(dist_util.dev())
        x_t = noise[start : start + args.batch_size].to(dist_util.dev())
        with torch.no_grad():
            x = sample_fn(
                model_fn, x_t.shape, noise=x_t, clip_denoised=True, cond_fn=cond_fn,
                model_kwargs={"y": y}, device=dist_util.dev(),
            )
        out.append(to_uint8(x.float()).cpu())
    return torch.cat(out).numpy(), labels.numpy()


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.0))
    for ax, metric in zip(axes, METRICS):
        for name in sorted({r["model"] for r in results}):
            rows = [r for r in results if r["model"] == name]
            ax.plot([r["scale"] for r in rows], [r[metric] for r in rows], marker="o", label=name)
        scales = sorted({r["scale"] for r in results})
        ax.set_xscale("symlog", linthresh=max(1e-3, min([s for s in scales if s > 0], default=1.0)))
        ax.set_xticks(scales)
        ax.set_xticklabels([f"{s:g}" for s in scales])
        ax.minorticks_off()
        ax.set_xlabel("classifier scale")
        ax.set_title(metric + (" (lower is better)" if metric == "fid" else ""), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = create_argparser().parse_args(argv)
    scales = parse_scales(args.scales)
    models = [(name, path, cond) for name, path, cond in (
        ("conditional", args.cond_model_path, True),
        ("unconditional", args.uncond_model_path, False),
    ) if path]
    if not models:
        raise SystemExit("error: pass --cond_model_path and/or --uncond_model_path")
    if not args.classifier_path:
        raise SystemExit("error: pass --classifier_path (a noisy classifier from classifier_train.py)")
    os.makedirs(os.path.join(args.out_dir, "grids"), exist_ok=True)
    logger.configure(dir=args.out_dir, format_strs=["stdout", "log"])
    torch.manual_seed(args.seed)

    classifier = load_guiding_classifier(args)
    logger.log("training the judge (a classifier on the real digits)...")
    judge = RealDigitsJudge(args.image_size, steps=args.judge_steps, seed=args.seed)
    logger.log(f"judge accuracy on held-out real digits: {judge.heldout_accuracy:.3f}")

    results = []
    for name, path, class_cond in models:
        model, diffusion = load_diffusion_model(args, path, class_cond)
        for scale in scales:
            t0 = time.time()
            cond_fn = make_classifier_cond_fn(classifier, scale) if scale > 0 else None
            images, labels = sample(model, diffusion, class_cond=class_cond, cond_fn=cond_fn, args=args)
            row = dict(model=name, scale=scale, **judge.metrics(images, labels))
            results.append(row)
            grid = grid_by_class(images[:100], labels[:100], num_classes=args.num_classes, upscale=4)
            Image.fromarray(grid).save(os.path.join(args.out_dir, "grids", f"{name}_scale{scale:g}.png"))
            logger.log(
                f"{name:13s} scale {scale:<5g} " + " ".join(f"{m} {row[m]:.3f}" for m in METRICS)
                + f" ({time.time() - t0:.0f} s)"
            )

    table = dict(
        judge_heldout_accuracy=judge.heldout_accuracy,
        config={k: v for k, v in vars(args).items()},
        results=results,
    )
    with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
        json.dump(table, f, indent=1)
    plot(results, os.path.join(args.out_dir, "sweep.png"))
    logger.log("| model | scale | " + " | ".join(METRICS) + " |")
    logger.log("|---|---:|" + "---:|" * len(METRICS))
    for r in results:
        logger.log(f"| {r['model']} | {r['scale']:g} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |")
    logger.log(f"wrote {args.out_dir}/sweep.json, sweep.png and grids/")


def create_argparser():
    defaults = dict(
        cond_model_path="",
        uncond_model_path="",
        classifier_path="",
        scales="0,0.5,1,2,5,10",
        num_samples=500,
        batch_size=250,
        use_ddim=True,
        judge_steps=1000,
        num_classes=10,
        seed=0,
        out_dir="runs/guidance_sweep",
    )
    flags = model_and_diffusion_defaults()
    flags.pop("class_cond")  # given by which model path is passed
    flags.update(timestep_respacing="ddim25")
    return script_parser(__doc__.split("\n\n")[0], defaults, flags, classifier_defaults(),
                         dict(classifier_channel_mult=""))


if __name__ == "__main__":
    run_main(main)
