"""
The VAE family: the networks, losses and checkpoint checks (networks), the training loop
(training), prior samples, reconstructions and interpolations, and loading a checkpoint with its
recorded flags (sampling), and PCA of the latent means with kNN accuracy and scatter plots (pca).
"""

from .networks import ARCH_FLAGS, ARCHS, GAUSSIAN_MIN_LOGVAR, LIKELIHOODS, VAE
from .networks import check_vae_checkpoint, create_vae, encode_means, evaluate_elbo, folder_batches
from .networks import gaussian_kl, interpolate, load_vae, spread_indices, vae_defaults, vae_losses
from .networks import vae_state
from .pca import PCAResult, class_colors, embedding_report, fit_pca, knn_accuracy, knn_predict
from .pca import majority_rate, plot_embedding, transform
from .sampling import sample_from_prior, save_interpolation, save_reconstructions, unit_to_uint8
from .sampling import vae_from_checkpoint, vae_tool_defaults
from .training import CHECKPOINT_PREFIX, VAETrainLoop, vae_train_defaults

_SUBMODULES = ("networks", "pca", "sampling", "training")
__all__ = sorted(n for n in dir() if not n.startswith("_") and n not in _SUBMODULES)
