"""
Sample quality against the number of model evaluations, per sampler and guidance scale, for
small models of labelled grayscale data such as the bundled digits.

FID (Heusel et al. 2017) is computed with the project's evaluator maths
(evaluations.metrics.FIDStatistics), not on Inception features, which mean little for 16x16
digits, but on the 64 penultimate features (after the ReLU of the hidden layer) of the
real-image classifier of cgan_eval (SampleClassifier), trained on the real images. The same
classifier reports how often a sample shows the class it was generated for.
"""

import json
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.evaluation.metrics import FIDStatistics

from guided_diffusion.diffusion.guidance import classifier_free_guidance
from guided_diffusion.cgan.evaluation import class_accuracy, to_eval_space, train_classifier
from guided_diffusion.sampling.files import make_grid_png, to_uint8
from guided_diffusion.sampling.loop import make_sample_fn

__all__ = [
    "check_budgets",
    "classifier_features",
    "real_reference",
    "generate",
    "merge_reports",
    "sweep",
    "write_report",
]


@torch.no_grad()
def classifier_features(classifier, images, *, batch_size=500):
    """
    :param classifier: a trained cgan_eval.SampleClassifier.
    :param images: float [N, C, H, W] in [0, 1].
    :return: float64 numpy [N, 64], the activations after the hidden layer's ReLU.
    """
    penultimate = classifier.head[:3]  # Flatten, Linear, ReLU (the Dropout is off in eval)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(images[start : start + batch_size], dtype=torch.float32)
        out.append(penultimate(classifier.features(batch * 2.0 - 1.0)))
    return torch.cat(out).double().numpy()


def real_reference(images_uint8, labels, *, num_classes, num_samples, classifier_steps=2000,
                   seed=0):
    """
    Train the feature classifier on the real images and compute their reference statistics.

    FID is biased upwards at small sample counts, so two real-versus-real levels come with it:
    one random half of the real images against the other half, and `num_samples` real images
    (drawn without replacement) against all of them, the score of a sampler that returned
    training images, at the sample count of the sweep.

    :param images_uint8: uint8 [N, H, W, 3] real images.
    :param labels: int64 [N].
    :param num_samples: the number of generated images each configuration will be scored on.
    :return: dict(classifier, stats (FIDStatistics of all real images), split_fid, subset_fid,
        real_accuracy, num_real, num_samples).
    """
    real = to_eval_space(images_uint8, grayscale=True)
    classifier = train_classifier(real, labels, num_classes=num_classes, steps=classifier_steps,
                                  seed=seed)
    features = classifier_features(classifier, real)
    stats = FIDStatistics.from_features(features)
    order = np.random.default_rng(seed).permutation(len(features))
    half = len(order) // 2
    split = FIDStatistics.from_features(features[order[:half]]).frechet_distance(
        FIDStatistics.from_features(features[order[half:]])
    )
    subset = FIDStatistics.from_features(features[order[:num_samples]]).frechet_distance(stats)
    accuracy, _ = class_accuracy(classifier, real, labels, num_classes=num_classes)
    return dict(classifier=classifier, stats=stats, split_fid=split, subset_fid=subset,
                real_accuracy=accuracy, num_real=len(features),
                num_samples=min(num_samples, len(features)))


def check_budgets(samplers, evaluations):
    """
    Refuse, before any work, a budget too small for a solver's order.

    :raises ValueError: one line naming the solver and its least budget.
    """
    from guided_diffusion.diffusion import solvers as solvers

    for name in samplers:
        if name in solvers.SOLVERS:
            for budget in evaluations:
                solvers.steps_for_evaluations(name, budget)


def generate(model, diffusion, *, sampler, guidance_scale, num_samples, batch_size,
             num_classes, seed, image_size, evaluations=None, clip_denoised=True, progress=False):
    """
    Sample class-conditional images with one sampler and guidance scale.

    The labels are balanced (sample i gets class i % num_classes) and the starting noise x_T of
    every batch comes from a generator seeded with `seed`, so every configuration starts from
    the same noise (ddpm's per-step noise comes from torch's global generator, seeded with
    `seed` + 1).

    :param diffusion: for ddpm and ddim, the diffusion respaced to the evaluation budget; for
        the ODE solvers, the model's diffusion (its respacing is not used).
    :param evaluations: the ODE solvers' budget of model evaluations (unused by ddpm and ddim).
    :param clip_denoised: clip each x_0 prediction to [-1, 1] (--clip_denoised).
    :return: (uint8 images [N, H, W, 3], int64 labels [N], model evaluations per image; with
        guidance_scale != 1 one evaluation is one forward pass over twice the batch).
    """
    sample_fn = make_sample_fn(sampler, diffusion, evaluations)
    calls = []

    def counted(x, t, **kwargs):
        calls.append(x.shape[0])
        return model(x, t, **kwargs)

    model_fn = classifier_free_guidance(counted, guidance_scale, null_label=num_classes)
    labels = torch.arange(num_samples) % num_classes
    noise_gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else "cpu"
    images = []
    batches = range(0, num_samples, batch_size)
    for start in batches:
        y = labels[start : start + batch_size]
        shape = (len(y), 3, image_size, image_size)
        noise = torch.randn(*shape, generator=noise_gen).to(device)
        sample = sample_fn(model_fn, shape, noise=noise, model_kwargs={"y": y.to(device)},
                           clip_denoised=clip_denoised, progress=progress)
        images.append(to_uint8(sample).cpu().numpy())
    evaluations = len(calls) / len(batches)
    return np.concatenate(images), labels.numpy(), evaluations


def sweep(model, build_diffusion, reference, *, samplers, evaluations, guidance_scales,
          num_samples, batch_size, num_classes, image_size, seed=0, grid_dir=None, log=print,
          clip_denoised=True, progress=False):
    """
    FID and class accuracy for every (guidance scale, sampler, evaluation budget).

    :param build_diffusion: a function respacing -> diffusion (the model's flags with that
        --timestep_respacing): ddpm and ddim get str(budget), the ODE solvers "" and the
        budget as their evaluations.
    :param reference: the dict of real_reference.
    :param grid_dir: if given, a PNG grid of the first 100 samples of each configuration.
    :param clip_denoised: as for generate.
    :param progress: a progress bar over the configurations.
    :return: a list of dicts (guidance_scale, sampler, budget, evaluations, fid, accuracy,
        seconds).
    """
    rows = []
    configs = [(w, n, b) for w in guidance_scales for n in samplers for b in evaluations]
    from guided_diffusion.diffusion.solvers import SOLVERS

    for scale, name, budget in tqdm(configs, disable=not progress, desc="configurations"):
        start = time.time()
        solver = name in SOLVERS
        images, labels, used = generate(
            model, build_diffusion("" if solver else str(budget)), sampler=name,
            guidance_scale=scale, num_samples=num_samples, batch_size=batch_size,
            num_classes=num_classes, seed=seed, image_size=image_size,
            evaluations=budget if solver else None, clip_denoised=clip_denoised,
        )
        samples = to_eval_space(images, grayscale=True)
        stats = FIDStatistics.from_features(
            classifier_features(reference["classifier"], samples))
        fid = stats.frechet_distance(reference["stats"])
        accuracy, _ = class_accuracy(reference["classifier"], samples, labels,
                                     num_classes=num_classes)
        row = dict(guidance_scale=scale, sampler=name, budget=budget,
                   evaluations=used, fid=fid, accuracy=accuracy,
                   seconds=round(time.time() - start, 1))
        rows.append(row)
        log(json.dumps(row))
        if grid_dir:
            os.makedirs(grid_dir, exist_ok=True)
            make_grid_png(images[:100], os.path.join(
                grid_dir, f"w{scale:g}_{name}_{budget}.png"), nrow=10)
    return rows


def write_report(rows, reference, out_dir, *, title=""):
    """
    Write sampler_fid.json, sampler_fid.md (a table per guidance scale) and sampler_fid.png
    (FID against model evaluations, a panel per guidance scale) into out_dir.

    :return: the markdown text.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    summary = dict(split_real_fid=reference["split_fid"], subset_real_fid=reference["subset_fid"],
                   num_real=reference["num_real"], num_samples=reference["num_samples"],
                   real_accuracy=reference["real_accuracy"], rows=rows)
    with open(os.path.join(out_dir, "sampler_fid.json"), "w") as f:
        json.dump(summary, f, indent=2)

    scales = sorted({r["guidance_scale"] for r in rows})
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    lines = []
    for scale in scales:
        kind = "class-conditional" if scale == 1 else f"classifier-free guidance w = {scale:g}"
        lines.append(f"FID ({kind}; class accuracy in brackets; model evaluations per image "
                     "where they differ from the budget):\n")
        lines.append("| sampler | " + " | ".join(f"{b} evals" for b in budgets) + " |")
        lines.append("|---" * (len(budgets) + 1) + "|")
        for name in names:
            cells = []
            for b in budgets:
                row = next((r for r in rows if r["guidance_scale"] == scale
                            and r["sampler"] == name and r["budget"] == b), None)
                if row is None:
                    cells.append("")
                    continue
                used = "" if row["evaluations"] == b else f" ({row['evaluations']:g} evals)"
                cells.append(f"{row['fid']:.2f} [{row['accuracy']:.2f}]{used}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Real images: {reference['num_samples']} of them against all "
                 f"{reference['num_real']}: FID {reference['subset_fid']:.2f}; one half against "
                 f"the other: {reference['split_fid']:.2f}; classifier accuracy on them "
                 f"{reference['real_accuracy']:.3f}.")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "sampler_fid.md"), "w") as f:
        f.write(text)

    fig, axes = plt.subplots(1, len(scales), figsize=(5 * len(scales), 4), squeeze=False)
    for ax, scale in zip(axes[0], scales):
        for name in names:
            points = sorted((r["evaluations"], r["fid"]) for r in rows
                            if r["guidance_scale"] == scale and r["sampler"] == name)
            ax.plot(*zip(*points), marker="o", label=name)
        ax.axhline(reference["subset_fid"], color="grey", linestyle=":",
                   label=f"{reference['num_samples']} real images")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Label the budgets themselves: log axes' default minor labels collide on a short range.
        budgets = sorted({r["budget"] for r in rows})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.yaxis.set_major_formatter(plt.ScalarFormatter())
        ax.set_xlabel("model evaluations per image")
        ax.set_ylabel("FID (digit-classifier features)")
        ax.set_title("class-conditional" if scale == 1 else f"CFG w = {scale:g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "sampler_fid.png"), dpi=100)
    plt.close(fig)
    return text


def merge_reports(report_paths, out_dir, *, title=""):
    """
    One report from several sampler_fid.json files of the same model, real images and seed
    (e.g. the samplers split over two processes), written as write_report does.

    :raises ValueError: when the reports were measured against different real statistics.
    :return: the markdown text.
    """
    summaries = []
    for path in report_paths:
        with open(path) as f:
            summaries.append(json.load(f))
    keys = ("split_real_fid", "subset_real_fid", "num_real", "num_samples", "real_accuracy")
    first = summaries[0]
    for path, other in zip(report_paths[1:], summaries[1:]):
        # Floats compared loosely: the classifier's training sums in a thread-dependent order.
        if any(not math.isclose(other[k], first[k], rel_tol=1e-6) for k in keys):
            raise ValueError(
                f"{path} was measured against other real images, classifier or sample count than "
                f"{report_paths[0]}: run both with the same --data_dir, --seed and --num_samples"
            )
    reference = dict(split_fid=first["split_real_fid"], subset_fid=first["subset_real_fid"],
                     num_real=first["num_real"], num_samples=first["num_samples"],
                     real_accuracy=first["real_accuracy"])
    rows = [row for summary in summaries for row in summary["rows"]]
    return write_report(rows, reference, out_dir, title=title)
