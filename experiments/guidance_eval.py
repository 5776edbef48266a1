"""
Judging class-conditional samples of the bundled digits with a classifier trained on the real
digits (the conditional GAN evaluator's SampleClassifier, independent of the noisy classifier that
guides sampling): class accuracy (fidelity to the requested class), improved precision and recall
(Kynkaenniemi et al. 2019) and FID on the classifier's 64-unit hidden features, and the spread of
the features within each class (diversity), after Dhariwal & Nichol 2021, section 4 and Table 4.

Images are uint8 [N, H, W, C] as the sampling scripts save them; they are judged in grey values
(the digits are grey; RGB samples are turned to luma).
"""

import numpy as np
import torch

from guided_diffusion.cgan import evaluation as cgan_eval

__all__ = [
    "RealDigitsJudge",
    "within_class_spread",
    "grid_by_class",
]


def _real_digits(image_size):
    # Imported here: datasets/ is a sibling package that only this evaluation needs.
    from guided_diffusion.data.digits import digits_arrays

    images, labels = digits_arrays(image_size)
    return images[..., None], labels


class RealDigitsJudge:
    """
    A SampleClassifier trained on the real digits at one image size, with the real features kept
    for the distribution metrics. The digits are split into train (the first 80%) and held-out
    images; the held-out accuracy says how far the judge itself can be trusted.

    :param image_size: the side of the images to judge (the digits are upscaled to it as
        datasets/digits.py does).
    :param steps: classifier training steps.
    :param seed: classifier seed.
    """

    num_classes = 10

    def __init__(self, image_size, *, steps=1000, seed=0):
        images, labels = _real_digits(image_size)
        split = int(0.8 * len(images))
        self.image_size = image_size
        self.real_u8, self.real_labels = images, labels
        x = cgan_eval.to_eval_space(images, grayscale=True)
        self.classifier = cgan_eval.train_classifier(
            x[:split], labels[:split], num_classes=self.num_classes, steps=steps, seed=seed
        )
        self.heldout_accuracy, _ = cgan_eval.class_accuracy(
            self.classifier, x[split:], labels[split:], num_classes=self.num_classes
        )
        self.real_features = self.features(images)

    def _eval_space(self, images_u8):
        images_u8 = np.asarray(images_u8)
        if images_u8.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"the samples are {images_u8.shape[1]}x{images_u8.shape[2]} but the judge was "
                f"trained on {self.image_size}x{self.image_size} digits: build it with "
                f"image_size={images_u8.shape[1]}"
            )
        return cgan_eval.to_eval_space(images_u8, grayscale=True)

    @torch.no_grad()
    def features(self, images_u8):
        """
        :param images_u8: uint8 [N, H, W, C].
        :return: float64 numpy [N, 64], the classifier's hidden layer (after its ReLU).
        """
        x = self._eval_space(images_u8)
        head = self.classifier.head
        # head = Flatten, Linear, ReLU, Dropout, Linear: the first three give the features.
        feats = head[2](head[1](head[0](self.classifier.features(x * 2.0 - 1.0))))
        return feats.double().numpy()

    @torch.no_grad()
    def predict(self, images_u8):
        """:return: int64 numpy [N] of predicted classes."""
        return cgan_eval.predict_classes(self.classifier, self._eval_space(images_u8)).numpy()

    def accuracy(self, images_u8, labels):
        """:return: the fraction of images classified as their requested label."""
        return float(np.mean(self.predict(images_u8) == np.asarray(labels)))

    def metrics(self, images_u8, labels):
        """
        :param images_u8: uint8 [N, H, W, C] samples.
        :param labels: the class each sample was generated for.
        :return: dict of accuracy, precision, recall, fid, spread (within-class feature spread of
            the samples divided by that of the real digits: 1 matches the data's diversity, lower
            is less diverse) and num_samples.
        """
        # Imported here: evaluations/ is a sibling package (the TF-compatible evaluator).
        from guided_diffusion.evaluation.metrics import (
            FIDStatistics,
            ManifoldEstimator,
            precision_recall,
        )

        feats = self.features(images_u8)
        predicted = self.predict(images_u8)
        real = self.real_features
        fid = FIDStatistics.from_features(feats).frechet_distance(
            FIDStatistics.from_features(real)
        )
        estimator = ManifoldEstimator(row_batch_size=2000, col_batch_size=2000)
        precision, recall = precision_recall(real, feats, estimator=estimator)
        real_spread = within_class_spread(real, self.real_labels)
        return dict(
            num_samples=int(len(feats)),
            accuracy=float(np.mean(predicted == np.asarray(labels))),
            precision=precision,
            recall=recall,
            fid=float(fid),
            spread=within_class_spread(feats, predicted) / real_spread,
        )


def within_class_spread(features, classes):
    """
    Diversity within classes: the root-mean-square distance of features to their class mean,
    averaged over the classes that have at least two members.

    :param features: [N, D] array.
    :param classes: [N] class of each row (e.g. the judge's prediction).
    :return: a float (NaN when no class has two members).
    """
    features = np.asarray(features, dtype=np.float64)
    classes = np.asarray(classes)
    spreads = []
    for c in np.unique(classes):
        members = features[classes == c]
        if len(members) >= 2:
            spreads.append(np.sqrt(((members - members.mean(0)) ** 2).sum(1).mean()))
    return float(np.mean(spreads)) if spreads else float("nan")


def grid_by_class(images_u8, labels, *, num_classes=10, upscale=1, pad=1):
    """
    A grid with one row per requested class (row k holds the samples generated for class k, in
    order), padded with black, so that class faithfulness can be seen at a glance.

    :param images_u8: uint8 [N, H, W, C].
    :param labels: [N] requested classes.
    :param upscale: nearest-neighbour magnification (8x8 digits are hard to see otherwise).
    :param pad: pixels of black between tiles.
    :return: uint8 [rows * (H + pad) + pad, cols * (W + pad) + pad, C] (after the upscale).
    """
    images = np.asarray(images_u8)
    labels = np.asarray(labels)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    rows = [np.flatnonzero(labels == k) for k in range(num_classes)]
    cols = max(1, max(len(r) for r in rows))
    grid = np.zeros((num_classes * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for k, members in enumerate(rows):
        for j, index in enumerate(members):
            y, x = pad + k * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = images[index]
    return grid
