"""
What each flag means: the one table of flag descriptions and --help groups (FLAG_HELP,
FLAG_GROUPS), and add_flag, which puts a flag on an argparse parser with its description, its
default and under its group. script_util.add_dict_to_argparser reads it for every script's
--help, and docs/generate_flags.py writes docs/flags.md from it and the scripts' parsers.
"""

from ..diffusion.solvers import SOLVER_TABLE


def _sampler_help():
    """--sampler's description, from the solver table so that it names every solver."""
    return ('"" (ddim with --use_ddim True, else ddpm), ddpm or ddim (the reference\'s samplers, '
            "stepping through --timestep_respacing), or a solver taking --evaluations and "
            f"--sigma_grid: {', '.join(SOLVER_TABLE)} (docs/solvers.md)")


# The groups of --help and of docs/flags.md, in the order they are shown, with their headings.
# A group named in NEW_FLAG_HELP but missing here is shown after these, under its own name.
FLAG_GROUPS = {
    "model": "the network's shape: sampling and evaluation need the values it was trained with",
    "diffusion": "the noising process and the steps the sampler takes",
    "classifier": "the noisy-image classifier and classifier guidance",
    "data": "what is read: image folders, checkpoints, sample and latent files",
    "training": "optimisation, checkpoints and logging",
    "sampling": "how many samples, and how they are drawn",
    "evaluation": "measuring samples and models",
    "performance": "speed and memory; results stay those of the defaults up to rounding",
    "cluster": "the run: batch size, seeds, output folders, progress and device",
}

# One row per flag name: (group, one-line description). A flag means the same in every script
# that has it (scripts differ only in defaults, which --help and docs/flags.md show per script);
# where model families read a flag differently, the line says so. Flags a concurrent change adds
# go into NEW_FLAG_HELP at the end of this file; flag_table() merges both.
FLAG_HELP = {
    # model
    "image_size": ("model", "side of the square images in pixels, or height,width for "
                            "rectangles (e.g. 32,48)"),
    "num_channels": ("model", "base width: channels of the first level (UNet; the VAE's "
                              "--arch conv network)"),
    "num_res_blocks": ("model", "residual blocks per resolution level of the UNet"),
    "num_heads": ("model", "attention heads per attention layer (used when --num_head_channels "
                           "is -1)"),
    "num_heads_upsample": ("model", "attention heads in the upsampling half (-1 = --num_heads)"),
    "num_head_channels": ("model", "channels per attention head, overriding --num_heads (-1 = "
                                   "use --num_heads)"),
    "attention_resolutions": ("model", "feature-map sizes whose levels get self-attention, "
                                       "comma-separated (e.g. 32,16,8)"),
    "channel_mult": ("model", 'width multiplier of each level, comma-separated ("" = by image '
                              "size, e.g. 64 -> 1,2,3,4; 32 -> 1,2,2,2)"),
    "dropout": ("model", "dropout probability (UNet residual blocks; cGAN: both networks)"),
    "class_cond": ("model", 'condition on class labels, read from the file names '
                            '("<class>_<name>.png")'),
    "num_classes": ("model", "number of classes of a class-conditional model or classifier: "
                             "your data's class count (the reference fixes 1000)"),
    "use_scale_shift_norm": ("model", "residual blocks take the timestep as a scale and a shift "
                                      "of the normalised activations (AdaGN) instead of a shift"),
    "resblock_updown": ("model", "downsample and upsample with residual blocks instead of plain "
                                 "convolutions"),
    "use_new_attention_order": ("model", "split the attention input into q, k, v before the "
                                         "heads (the legacy order splits heads first)"),
    "large_size": ("model", "super-resolution: side of the images the model produces"),
    "small_size": ("model", "super-resolution: side of the low-resolution images it upsamples"),
    "class_dropout_prob": ("model", "classifier-free guidance: rate at which training replaces "
                                    "labels by the null class; > 0 adds the null-class row, so "
                                    "pass the training value when sampling too"),
    "arch": ("model", 'network family: diffusion models "unet" (the reference\'s) or "dit" '
                      '(the transformer of Peebles & Xie 2023, docs/dit.md); cGAN/VAE "mlp" '
                      '(the papers\' fully connected networks) or "conv" (convolutional, RGB)'),
    "z_dim": ("model", "cGAN: dimension of the generator's noise z"),
    "conv_channels": ("model", "cGAN with --arch conv: width of the convolutional networks"),
    "latent_size": ("model", "VAE: dimension of the latent z"),
    "hidden_size": ("model", "VAE with --arch mlp: width of the hidden layers"),
    "likelihood": ("model", 'VAE decoder: "bernoulli" (grey levels as probabilities) or '
                            '"gaussian"'),
    "in_channels": ("model", "image channels: 3 = RGB (released checkpoints), 1 = grey, any "
                             "count for .npy data"),
    "dit_model": ("model", 'the DiT\'s size with --arch dit: DiT-S/2 ... DiT-XL/8 (the paper\'s '
                           'twelve: S, B, L, XL with patch 2, 4 or 8) or '
                           '"depth=D,width=W,heads=H,patch=P"'),
    # diffusion
    "learn_sigma": ("diffusion", "the model also predicts the variances (6 output channels; "
                                 "Nichol & Dhariwal 2021)"),
    "diffusion_steps": ("diffusion", "number of diffusion steps T the model is trained with"),
    "noise_schedule": ("diffusion", 'beta schedule: "linear" or "cosine"'),
    "timestep_respacing": ("diffusion", 'which of the T steps to use: "" = all, "250" (evenly '
                                        'spaced), "ddim50" (DDIM striding), "10,20,30" (per '
                                        'section); reproduce: "" = the paper\'s'),
    "use_kl": ("diffusion", "train on the variational bound (loss RESCALED_KL)"),
    "predict_xstart": ("diffusion", "the model predicts x_0 instead of the noise"),
    "rescale_timesteps": ("diffusion", "give the model timesteps scaled to 0..1000 whatever T is"),
    "rescale_learned_sigmas": ("diffusion", "loss RESCALED_MSE: the MSE plus the variational "
                                            "term scaled by T/1000 (with --learn_sigma)"),
    # classifier
    "classifier_use_fp16": ("classifier", "run the classifier's torso in float16"),
    "classifier_width": ("classifier", "classifier base width (channels of its first level)"),
    "classifier_depth": ("classifier", "residual blocks per level of the classifier"),
    "classifier_attention_resolutions": ("classifier", "feature-map sizes with attention in the "
                                                       "classifier, comma-separated"),
    "classifier_use_scale_shift_norm": ("classifier", "AdaGN (scale and shift) in the "
                                                      "classifier's residual blocks"),
    "classifier_resblock_updown": ("classifier", "the classifier downsamples with residual "
                                                 "blocks"),
    "classifier_pool": ("classifier", 'classifier head: "attention", "adaptive", "spatial" or '
                                      '"spatial_v2"'),
    "classifier_channel_mult": ("classifier", 'classifier width multiplier of each level ("" = '
                                              "by image size)"),
    "classifier_path": ("classifier", "the noisy classifier's checkpoint (a modelNNNNNN.pt of "
                                      "classifier_train.py)"),
    "classifier_scale": ("classifier", "classifier guidance scale: multiplies the gradient of "
                                       "log p(y | x_t)"),
    "noised": ("classifier", "train on noised images x_t at random timesteps (False: clean "
                             "images)"),
    "guidance_at": ("classifier", "where ancestral sampling takes the classifier gradient: x_t "
                                  "(the reference's) or mean (the predicted mean of x_{t-1} at "
                                  "step t-1, as in the paper; GD#51)"),
    # data
    "data_dir": ("data", 'folder of images, searched recursively, class = file name before the '
                         'first "_": the training data, or the real images a tool compares with'),
    "val_data_dir": ("data", 'held-out images for the validation loss and accuracy ("" = none)'),
    "test_dir": ("data", "cGAN evaluation: held-out real images (split into a validation and a "
                         "test half)"),
    "random_flip": ("data", "flip training images horizontally at random"),
    "preload": ("data", "read the images into memory once instead of decoding files every "
                        "epoch"),
    "model_path": ("data", "the checkpoint to sample from or evaluate, written by the matching "
                           "*_train.py"),
    "cond_model_path": ("data", "a class-conditional diffusion checkpoint to sweep"),
    "uncond_model_path": ("data", "an unconditional diffusion checkpoint to sweep"),
    "base_samples": ("data", "npz of low-resolution images to upsample (image_sample.py's "
                             "output)"),
    "input": ("data", "images to invert: a folder, or an npz of uint8 NHWC images (arr_0)"),
    "latents": ("data", 'latents.npz of ddim_invert.py to decode ("" = draw the latents with '
                        "--seed)"),
    "sample_path": ("data", "an npz of samples with labels (cgan_sample.py's output) to "
                            "evaluate instead of --model_path"),
    "features_npz": ("data", 'analyse these features instead of a VAE: an npz with "features" '
                             '[N, D] and optionally "labels"'),
    "limit": ("data", "write only the first N images (default: all)"),
    "resample": ("data", "filter that resizes the 8x8 digits to --image_size"),
    "num_images": ("data", "use only the first N images (0 = all)"),
    "max_images": ("data", "use at most this many images, spread over the folder (0 = all)"),
    "random_crop": ("data", "crop training images at a random place and scale (short side "
                            "scaled to 1 to 1.25 times the size)"),
    "npz": ("data", "a samples npz (arr_0 uint8 images, arr_1 labels when present)"),
    "folder": ("data", "a folder of images, searched recursively"),
    "out_npz": ("data", "the npz file to write"),
    "names": ("data", "released checkpoint names (e.g. 64x64_diffusion), or all"),
    "base_url": ("data", "where the checkpoints are downloaded from (a mirror; default: the "
                         "reference's release)"),
    "list": ("data", "print what there is and do nothing else (download_checkpoints: the "
                     "released checkpoints with sizes and flags; reproduce: the paper rows)"),
    "archive": ("data", "the dataset archive as its authors distribute it"),
    "lmdb_path": ("data", "an LSUN lmdb database (e.g. bedroom_train_lmdb)"),
    "prefix": ("data", "class name the files are named with (<prefix>_<index>.png)"),
    "config": ("data", "a training run's args.json whose model and diffusion flags to use (\"\" = "
                       "the args.json beside --model_path if there is one; none = never); flags "
                       "given on the command line win"),
    "val_num_images": ("data", "images of the fixed validation subset taken from --val_data_dir "
                               "(shared among the ranks)"),
    "checkpoint_dir": ("data", "folder of the released checkpoints, under their released file "
                               "names (download_checkpoints.py --out_dir)"),
    "ref_dir": ("data", "folder of the reference batches, under their released file names"),
    "vae_path": ("data", "a local diffusers AutoencoderKL folder: decode sampled latents "
                         'to images with it ("" = write the latents as they are; docs/dit.md)'),
    # training
    "schedule_sampler": ("training", 'how training draws timesteps: "uniform" or '
                                     '"loss-second-moment" (by their recent losses)'),
    "lr": ("training", "learning rate (cGAN: 0 = the optimiser's default)"),
    "weight_decay": ("training", "weight decay of the optimiser (AdamW)"),
    "lr_anneal_steps": ("training", "decay the learning rate linearly to 0 over this many steps "
                                    "and stop there (0 = constant rate, train until stopped); "
                                    "the horizon of --lr_schedule"),
    "lr_warmup_steps": ("training", "raise the learning rate linearly from 0 to --lr over the "
                                    "first N steps (0 = no warm-up; must end before the "
                                    "schedule's horizon)"),
    "lr_schedule": ("training", 'learning rate after the warm-up: "constant", "linear" or '
                                '"cosine" (0.5 * (1 + cos(pi * progress))) down to 0 at the '
                                "horizon, --lr_anneal_steps or --iterations; the reference's "
                                "--lr_anneal_steps / --anneal_lr alone mean linear"),
    "ema_rate": ("training", "decay rate(s) of the weights' exponential moving average, "
                             "comma-separated; one ema_<rate>_NNNNNN.pt per rate"),
    "log_interval": ("training", "write the table of losses every this many steps"),
    "save_interval": ("training", "write checkpoints every this many steps (and at the end)"),
    "resume_checkpoint": ("training", 'continue from this checkpoint ("auto" = the newest '
                                      "readable one in the log folder, which --log_dir must "
                                      'fix; "" = start afresh)'),
    "fp16_scale_growth": ("training", "with --use_fp16: how much log2 of the loss scale grows "
                                      "per step without overflow"),
    "max_steps": ("training", "stop after this many steps of this run (0 = no limit)"),
    "iterations": ("training", "number of training steps in all"),
    "anneal_lr": ("training", "decay the learning rate linearly to 0 over --iterations (= "
                              "--lr_schedule linear)"),
    "eval_interval": ("training", "evaluate on --val_data_dir every this many steps"),
    "optimizer": ("training", 'cGAN optimiser: "adam" or "sgd" (the paper\'s momentum SGD with '
                              "its schedule)"),
    "adam_beta1": ("training", "cGAN adam: decay of the first moment"),
    "adam_beta2": ("training", "cGAN adam: decay of the second moment"),
    "lr_decay": ("training", "cGAN sgd: the learning rate is divided by this after every step"),
    "min_lr": ("training", "cGAN sgd: lower bound of the learning rate"),
    "momentum": ("training", "cGAN sgd: momentum at the start"),
    "final_momentum": ("training", "cGAN sgd: momentum reached after --momentum_saturate_steps"),
    "momentum_saturate_steps": ("training", "cGAN sgd: steps of the linear momentum ramp"),
    "beta": ("training", "VAE: weight of the KL term (1 = the ELBO, > 1 a beta-VAE)"),
    "log_format": ("training", "rank 0's log outputs, comma-separated from stdout, log, csv, "
                               'json, tensorboard, wandb ("" = $OPENAI_LOG_FORMAT, else '
                               "stdout,log,csv); wandb runs offline unless $WANDB_MODE says "
                               "otherwise"),
    "keep_checkpoints": ("training", "keep only the newest K checkpoint sets, deleting older "
                                     "ones once a new set is on disk (never the one resumed "
                                     "from); -1 = keep all"),
    "save_format": ("training", "the model and EMA files of each checkpoint set: pt (torch.save, "
                                "as the reference) or safetensors (.safetensors files; the "
                                "optimizer and state files stay .pt); resume finds either"),
    "grad_clip": ("training", "clip the global gradient norm to this before each step (logged "
                              "as grad_norm_clipped); 0 = never"),
    "ema_warmup_power": ("training", "warm the EMA decay up as min(ema_rate, 1 - (1 + step / "
                                     "ema_inv_gamma) ** -power), e.g. 0.6667 for short runs; 0 "
                                     "= constant --ema_rate (the reference)"),
    "ema_inv_gamma": ("training", "step scale of the EMA warm-up (see --ema_warmup_power)"),
    "init_checkpoint": ("training", "fine-tune: start a fresh run (step 0, new optimizer, EMA = "
                                    "weights) from this checkpoint's weights; ignored when the "
                                    "run resumes"),
    "init_num_classes": ("training", "with --init_checkpoint: re-initialise the label embedding "
                                     "(classifier: the output head) for K classes (the model gets "
                                     "--num_classes K); 0 = keep the checkpoint's"),
    "init_add_null_class": ("training", "with --init_checkpoint: add the null-class row of "
                                        "classifier-free guidance to the checkpoint's label "
                                        "embedding (with --class_dropout_prob > 0)"),
    "sample_interval": ("training", "every N steps rank 0 writes samples_stepNNNNNN.png (EMA "
                                    "weights, fixed noise and labels, DDIM) to the log folder "
                                    "and TensorBoard; 0 = never"),
    "sample_steps": ("training", "DDIM steps of the --sample_interval grids"),
    "val_interval": ("training", "every N steps log the loss terms on the --val_data_dir subset "
                                 "(val_loss, val_mse, val_vb and their quarters)"),
    "fid_interval": ("training", "every N steps log a proxy FID (fid, fid_seconds) of "
                                 "--fid_samples EMA samples against --fid_ref; 0 = never"),
    "fid_ref": ("training", "the reference batch of the proxy FID: an npz with mu and sigma "
                            "(the reference's batches, make_ref_batch.py --stats True) or "
                            "uint8 images in arr_0 (their statistics computed once at start)"),
    "fid_samples": ("training", "samples of each proxy FID, shared among the ranks (at least "
                                "2; 1000-5000 read higher than a 50k FID, docs/training.md)"),
    "fid_steps": ("training", "DDIM steps of the proxy FID's samples"),
    # sampling
    "num_samples": ("sampling", "how many samples to make (image_nll: images to score; "
                                "ddim_consistency: latents to decode; reproduce: 0 = the "
                                "paper's, any other count is not the paper's setting)"),
    "use_ddim": ("sampling", "sample with DDIM instead of ancestral (DDPM) sampling"),
    "clip_denoised": ("sampling", "clip each step's prediction of x_0 to [-1, 1]"),
    "sampler": ("sampling", _sampler_help()),
    "guidance_scale": ("sampling", "classifier-free guidance weight: 1 = plain conditional "
                                   "sampling, 0 = unconditional, > 1 = stronger conditioning"),
    "class_label": ("sampling", "draw every sample of this class (-1 = none fixed: diffusion "
                                "samplers draw at random, cGAN takes every class in turn)"),
    "grid_per_class": ("sampling", "samples per class row of the PNG grid"),
    "use_ema": ("sampling", "cGAN: use the generator's moving average instead of its last "
                            "weights"),
    "sample_dropout": ("sampling", "cGAN: keep dropout on while sampling (more varied samples)"),
    "num_recon": ("sampling", "VAE: images to reconstruct, spread over the sorted folder"),
    "interp_steps": ("sampling", "VAE: points on the interpolation between two encoded images"),
    "steps": ("sampling", "DDIM step count(s), comma-separated where several are compared"),
    "num_pairs": ("sampling", "pairs of latents to interpolate between"),
    "num_points": ("sampling", "points on each interpolation path, ends included"),
    "eta": ("sampling", "DDIM eta (noise added per step); inversion needs 0"),
    "grid_images": ("sampling", "images per row of the reconstruction grid"),
    "scales": ("sampling", "classifier guidance scales to sweep, comma-separated"),
    "samplers": ("sampling", "samplers to compare, comma-separated"),
    "evaluations": ("sampling", "model evaluations per sample for the ODE solvers (--sampler "
                                "euler|heun|dpmpp_*); required with them, 0 with ddpm/ddim "
                                "(they use --timestep_respacing)"),
    "guidance_scales": ("sampling", "classifier-free guidance scales to compare, "
                                    "comma-separated"),
    "sigma_grid": ("sampling", "noise levels of the ODE solvers: karras, logsnr (uniform in log "
                               "sigma) or time (uniform in timestep); empty = the solver's "
                               "measured default"),
    "mask": ("sampling", "image_inpaint.py: a mask PNG for every image, or a folder of masks "
                         "named like the images; white = keep"),
    "invert_mask": ("sampling", "image_inpaint.py: black = keep instead of white"),
    "jump_length": ("sampling", "image_inpaint.py: RePaint's jump, reverse steps run before "
                                "noising back up (1 = every step)"),
    "resamplings": ("sampling", "image_inpaint.py: RePaint's resampling, times each stretch of "
                                "--jump_length steps is run (1 = none)"),
    "edit_strength": ("sampling", "image_edit.py: SDEdit's t0 / T in (0, 1]: how far the input "
                                  "is noised before denoising (1 = sample from noise)"),
    "save_images": ("sampling", "also write one PNG per sample (<index>_<label>.png) into a "
                                "folder named like the npz"),
    "balanced_labels": ("sampling", "draw the classes in turn so every class gets the same "
                                    "count (instead of at random)"),
    "guidance_channels": ("sampling", 'channels classifier-free guidance extrapolates: all, or '
                                      'first3 (as DiT\'s sample.py, to match its FIDs)'),
    # evaluation
    "ref_batch": ("evaluation", "reference batch: an npz with uint8 NHWC images in 0..255 "
                                "(arr_0, optionally with statistics), or a folder of images"),
    "sample_batch": ("evaluation", "sample batch: an npz with uint8 NHWC images in 0..255 "
                                   "(arr_0), e.g. image_sample.py's output, or a folder of "
                                   "images"),
    "samples": ("evaluation", "samples_*.npz files with class labels (arr_1)"),
    "inception_path": ("evaluation", "PyTorch weights of the 2015-12-05 Inception network "
                                     "(default: the torch hub cache, then the current folder)"),
    "sigma_start": ("evaluation", "Parzen kernel widths tried: from 10**sigma_start"),
    "sigma_end": ("evaluation", "Parzen kernel widths tried: up to 10**sigma_end"),
    "sigma_steps": ("evaluation", "number of Parzen kernel widths tried (log-spaced)"),
    "valid_limit": ("evaluation", "held-out images used to choose the Parzen kernel width"),
    "classifier_steps": ("evaluation", "training steps of the classifier that judges samples "
                                       "(trained on the real images)"),
    "judge_steps": ("evaluation", "training steps of the real-digits classifier that judges "
                                  "samples"),
    "upscale": ("evaluation", "nearest-neighbour magnification of the grids"),
    "knn_k": ("evaluation", "k of the leave-one-out k-nearest-neighbour accuracy"),
    "classifier_scales": ("evaluation", "experiments/sdedit_digits.py: classifier-guidance "
                                        "scales to edit with, comma-separated"),
    "num_inputs": ("evaluation", "experiments/sdedit_digits.py: held-out digits to edit"),
    "strengths": ("evaluation", "experiments/sdedit_digits.py: edit strengths (SDEdit's t0 / "
                                "T), comma-separated"),
    "budgets": ("evaluation", "experiments/solver_grids.py: model-evaluation budgets to "
                              "compare, comma-separated"),
    "stats": ("evaluation", "also store the Inception statistics (mu, sigma, mu_s, sigma_s), so "
                            "the evaluator need not recompute them"),
    "row": ("evaluation", "the paper row to reproduce, by key (--list True names them, e.g. "
                          "adm_g_256, adm_u_256, lsun_bedroom)"),
    "extra_flags": ("evaluation", "more flags for every sampling stage, winning over the "
                                  "paper's (tests shrink the networks); the run is then not the "
                                  "paper's"),
    # performance
    "use_fp16": ("performance", "run the network's torso in float16 (training: with a dynamic "
                                "loss scale)"),
    "use_bf16": ("performance", "run the network's torso in bfloat16 (training: with float32 "
                                "master weights)"),
    "use_checkpoint": ("performance", "recompute activations in the backward pass (gradient "
                                      "checkpointing): less memory, more time"),
    "microbatch": ("performance", "split each batch into pieces of this size and accumulate "
                                  "their gradients (-1 = no split)"),
    "compile": ("performance", "torch.compile the networks (falls back to eager with one line)"),
    "tf32": ("performance", "on CUDA, let float32 matrix products use TF32 tensor cores"),
    "channels_last": ("performance", "keep activations and convolution weights channels-last "
                                     "(NHWC)"),
    # the run
    "batch_size": ("cluster", "images per batch on each process (a training step, a sampling "
                              "round, a forward pass)"),
    "seed": ("cluster", "random seed; each process adds its rank"),
    "log_dir": ("cluster", 'folder for log.txt and checkpoints ("" = $OPENAI_LOGDIR, else a '
                           "new dated folder in the temp dir; digits_report: else no log file)"),
    "out_dir": ("cluster", 'folder the outputs are written to (where optional, "" = the log '
                           "folder)"),
    "progress": ("cluster", "show progress bars (on rank 0)"),
    "device": ("cluster", "torch device (default: cuda when available, else cpu)"),
    "overwrite": ("cluster", "replace a finished result in the output folder (its npz, grid and "
                             "per-image files; other files are kept) and discard the kept "
                             "batches of another command; False: refuse both"),
}


def flag_table():
    """FLAG_HELP with the rows of NEW_FLAG_HELP added (theirs win where both have a flag)."""
    return {**FLAG_HELP, **NEW_FLAG_HELP}


def flag_help(name):
    """(group, description) of a flag, or None when the table has no row for it."""
    return flag_table().get(name)


def format_default(default):
    """How --help and docs/flags.md show a default: "" for an empty string, else the value."""
    if isinstance(default, str):
        return '""' if default == "" else default
    return str(default)


def add_flag(parser, name, *, positional=False, **kwargs):
    """
    Add one flag to an argparse parser with its description from the table, its default, and
    under its group's heading.

    :param name: the flag without dashes, e.g. "image_size" (becomes --image_size), or a
        positional argument's name with positional=True.
    :param kwargs: argparse.add_argument keywords (default, type, required, nargs, choices);
        an explicit help= is kept only for flags the table lacks.
    :return: the argparse action.
    """
    row = flag_help(name)
    text = row[1] if row is not None else kwargs.pop("help", None)
    kwargs.pop("help", None)
    if not positional:
        if kwargs.get("required"):
            suffix = "required"
        elif kwargs.get("default") is not None:
            suffix = f"default: {format_default(kwargs['default'])}"
        else:
            suffix = None
        text = "; ".join(part for part in (text, suffix) if part)
    # argparse %-formats help strings (for %(default)s); our texts are plain.
    kwargs["help"] = text.replace("%", "%%") if text else None
    container = parser if row is None else _group(parser, row[0])
    if positional:
        return container.add_argument(name, **kwargs)
    return container.add_argument(f"--{name}", **kwargs)


def _group(parser, group):
    """The argument group of `group` on `parser`, created at its place in FLAG_GROUPS order."""
    groups = parser.__dict__.setdefault("_gd_flag_groups", {})
    if group not in groups:
        groups[group] = parser.add_argument_group(group, FLAG_GROUPS.get(group))
        # argparse prints groups in creation order; keep FLAG_GROUPS' order whatever order a
        # script's defaults come in (positionals and general options stay first).
        order = list(FLAG_GROUPS)
        rank = {id(g): order.index(n) if n in order else len(order) for n, g in groups.items()}
        ours = [g for g in parser._action_groups if id(g) in rank]
        others = [g for g in parser._action_groups if id(g) not in rank]
        parser._action_groups[:] = others + sorted(ours, key=lambda g: rank[id(g)])
    return groups[group]



# Rows of flags a concurrent change adds, kept out of FLAG_HELP until they are folded into it
# (so that two changes adding flags do not edit the same lines): name -> (group, one-line
# description). flag_table() merges them into FLAG_HELP (theirs win), so they show in --help and
# docs/flags.md at once. Empty once every change has been folded in.
NEW_FLAG_HELP = {}
