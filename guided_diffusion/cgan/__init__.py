"""
The conditional GAN of Mirza & Osindero 2014: networks and losses (networks), the training loop,
checkpoints and sampling (training), labelled image data and MNIST (data), and the paper's
evaluation: Parzen-window log-likelihood and class accuracy (evaluation).
"""

from .data import (
    MNIST_FILES,
    MNIST_TRAIN_SIZE,
    ArrayBatches,
    array_batches,
    cgan_training_batches,
    count_classes,
    is_mnist_dir,
    load_labeled_images,
    read_mnist,
    uint8_to_float,
)
from .evaluation import (
    SampleClassifier,
    class_accuracy,
    default_sigmas,
    evaluate_samples,
    is_grayscale,
    parzen_estimate,
    parzen_log_likelihood,
    predict_classes,
    select_parzen_sigma,
    to_eval_space,
    train_classifier,
)
from .networks import (
    ARCHS,
    MODEL_FLAG_KEYS,
    OPTIMIZERS,
    PAPER_Z_DIM,
    ConvDiscriminator,
    ConvGenerator,
    Maxout,
    MLPDiscriminator,
    MLPGenerator,
    PaperMomentumSGD,
    cgan_defaults,
    create_cgan,
    discriminator_loss,
    generator_loss,
    one_hot,
    paper_sgd_schedule,
    real_to_model_space,
    rgb_to_gray,
    sample_noise,
)
from .training import (
    ADAM_LR,
    CHECKPOINT_PREFIX,
    PAPER_SGD,
    CGANTrainLoop,
    balanced_labels,
    cgan_train_defaults,
    check_checkpoint_flags,
    class_grid,
    generate_samples,
    load_cgan_checkpoint,
    load_generator,
    resolve_resume_checkpoint,
)

__all__ = [name for name in dir() if not name.startswith("_") and name not in
           ("data", "evaluation", "networks", "training")]
