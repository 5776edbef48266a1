"""
Classifier-free guidance (Ho & Salimans 2022): train one network both conditionally and
unconditionally by replacing labels with a null class at a small rate, then sample with the
extrapolated noise prediction eps_uncond + w * (eps_cond - eps_uncond).

The null class is one extra row of the label embedding, index num_classes. The factories add it
only when class_dropout_prob > 0, so a model built with the default 0 has exactly the
reference's layout and every released checkpoint loads strict.
"""

import torch
import torch.nn.functional as F

__all__ = [
    "make_classifier_cond_fn",
    "check_class_dropout_prob",
    "check_guidance_scale",
    "classifier_free_guidance",
    "drop_labels",
    "has_null_class",
    "label_rows",
]

# The flag that trains a model with a null class, for messages.
TRAIN_FLAG_HINT = "train one with image_train.py --class_dropout_prob 0.1 (e.g.)"


def check_class_dropout_prob(class_dropout_prob, class_cond):
    """
    :raises ValueError: unless 0 <= class_dropout_prob < 1, and class_cond when it is > 0.
    """
    if not 0.0 <= class_dropout_prob < 1.0:
        raise ValueError(
            f"--class_dropout_prob must lie in [0, 1), got {class_dropout_prob} (0.1 is usual)"
        )
    if class_dropout_prob > 0 and not class_cond:
        raise ValueError(
            "--class_dropout_prob needs a class-conditional model: pass --class_cond True"
        )


def label_rows(num_classes, class_dropout_prob):
    """The number of label embedding rows: num_classes, plus the null class when p > 0."""
    return num_classes + 1 if class_dropout_prob > 0 else num_classes


def has_null_class(model, null_label):
    """True when the model's label embedding has a row for index null_label."""
    # The network's label table (guided_diffusion/networks.py: label_embedding()), read by
    # duck typing: the maths layer imports no network.
    find = getattr(model, "label_embedding", None)
    emb = find() if callable(find) else getattr(model, "label_emb", None)
    return emb is not None and emb.num_embeddings > null_label


def drop_labels(y, *, prob, null_label):
    """
    Replace each label by null_label with probability prob.

    One torch.rand(len(y)) draw from the global generator on y's device, and none when prob is
    0, so that runs without label dropout draw exactly what they drew before.

    :param y: an int64 tensor of labels [N].
    :return: a new tensor of labels.
    """
    if prob <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < prob
    return torch.where(drop, torch.full_like(y, null_label), y)


def check_guidance_scale(guidance_scale, *, class_cond, class_dropout_prob):
    """
    Refuse a classifier-free guidance scale other than 1 for a model without a null class.

    :raises ValueError: one line naming the flag that trains a null class.
    """
    if guidance_scale == 1.0:
        return
    if not class_cond:
        raise ValueError(
            f"--guidance_scale {guidance_scale} needs a class-conditional model trained with a "
            f"null class (--class_cond True --class_dropout_prob > 0): {TRAIN_FLAG_HINT}"
        )
    if class_dropout_prob <= 0:
        raise ValueError(
            f"--guidance_scale {guidance_scale} needs a model trained with a null class: "
            f"{TRAIN_FLAG_HINT}, and pass that --class_dropout_prob when sampling"
        )


def classifier_free_guidance(model, guidance_scale, null_label, channels=None):
    """
    Wrap a class-conditional model so that it returns the guided prediction
    out_uncond + w * (out_cond - out_uncond) (Ho & Salimans 2022, eq. 6).

    The conditional and unconditional predictions come from one forward pass over the batch
    [x; x] with labels [y; null_label] (other tensor inputs, e.g. the low-resolution image of
    a super-resolution model, are repeated). The combination is the same whether the model
    predicts eps, x_0 or the previous x: each is an affine function of eps with coefficients
    that do not depend on the label. With learned variances (6 output channels), the variance
    channels are taken from the conditional half: guidance extrapolates the mean only.

    :param model: called as model(x, t, y=labels, **kwargs).
    :param guidance_scale: w; with 1 the model itself is returned, so sampling is bit-identical
        to plain conditional sampling (and costs one evaluation, not two).
    :param null_label: the label index of the null class (num_classes).
    :param channels: guide only the first this many channels, the others (and the variance
        values) taken from the conditional half: 3 reproduces DiT's sample.py on 4-channel
        latents (its forward_with_cfg guides channels 0-2 only). None: every image channel.
    :return: a function model_fn(x, t, y=None, **kwargs) with the model's output shape.
    """
    if guidance_scale == 1.0:
        return model
    if isinstance(model, torch.nn.Module) and not has_null_class(model, null_label):
        raise ValueError(
            f"classifier-free guidance needs a model with a null class (label {null_label}): "
            f"{TRAIN_FLAG_HINT}"
        )

    def model_fn(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        n = x.shape[0]
        doubled = {k: _repeat(v, n) for k, v in kwargs.items()}
        y_in = torch.cat([y, torch.full_like(y, null_label)])
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=y_in, **doubled)
        cond, uncond = out[:n], out[n:]
        k = x.shape[1] if channels is None else channels
        guided = uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    return model_fn


def _repeat(value, n):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return torch.cat([value, value])
    return value


def make_classifier_cond_fn(classifier, classifier_scale):
    """
    The guidance gradient of Dhariwal & Nichol 2021 (Algorithm 1): s * grad_x log p_phi(y | x_t).

    :param classifier: a noisy-image classifier taking (x, t) and returning logits.
    :param classifier_scale: the guidance scale s.
    :return: cond_fn(x, t, y=None) for the samplers.
    """

    def cond_fn(x, t, y=None):
        if y is None:
            raise ValueError("classifier guidance needs class labels y")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits, dim=-1)
            # gather rather than indexing with range(N): that index would be built on the host
            # and copied to the device at every step (a synchronisation on a GPU).
            selected = log_probs.gather(1, y.view(-1, 1).to(logits.device)).squeeze(1)
            return torch.autograd.grad(selected.sum(), x_in)[0] * classifier_scale

    return cond_fn
