"""
The conditional GAN of Mirza & Osindero 2014: networks and losses (networks), the training task
of the one engine and its checkpoints (training), sampling (sampling), labelled image data and
MNIST (data), and the paper's evaluation: Parzen-window log-likelihood and class accuracy
(evaluation).
"""

from .data import MNIST_FILES, MNIST_TRAIN_SIZE, ArrayBatches, array_batches, cgan_training_batches
from .data import count_classes, is_mnist_dir, load_labeled_images, read_mnist, uint8_to_float
from .evaluation import SampleClassifier, class_accuracy, default_sigmas, evaluate_samples
from .evaluation import is_grayscale, parzen_estimate, parzen_log_likelihood, predict_classes
from .evaluation import select_parzen_sigma, to_eval_space, train_classifier
from .networks import ARCHS, MODEL_FLAG_KEYS, OPTIMIZERS, PAPER_Z_DIM, ConvDiscriminator
from .networks import ConvGenerator, Maxout, MLPDiscriminator, MLPGenerator, PaperMomentumSGD
from .networks import cgan_defaults, create_cgan, discriminator_loss, generator_loss, one_hot
from .networks import paper_sgd_schedule, real_to_model_space, rgb_to_gray, sample_noise
from .sampling import balanced_labels, class_grid, generate_samples, load_generator
from .training import ADAM_LR, CHECKPOINT_PREFIX, PAPER_SGD, CGANTrainLoop
from .training import cgan_train_defaults, check_checkpoint_flags, load_cgan_checkpoint
from .sampling import generator_flags

_SUBMODULES = ("data", "evaluation", "networks", "sampling", "training")
__all__ = sorted(n for n in dir() if not n.startswith("_") and n not in _SUBMODULES)
