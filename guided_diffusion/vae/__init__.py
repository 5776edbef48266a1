"""
The VAE family: the networks, losses and checkpoint checks (networks), the training loop
(training), prior samples, reconstructions and interpolations (sampling), and PCA of the latent
means with kNN accuracy and scatter plots (pca).
"""

from .networks import (
    ARCH_FLAGS,
    ARCHS,
    GAUSSIAN_MIN_LOGVAR,
    LIKELIHOODS,
    VAE,
    check_vae_checkpoint,
    create_vae,
    encode_means,
    evaluate_elbo,
    folder_batches,
    gaussian_kl,
    interpolate,
    load_vae,
    spread_indices,
    vae_defaults,
    vae_losses,
    vae_state,
)
from .pca import (
    PCAResult,
    class_colors,
    embedding_report,
    fit_pca,
    knn_accuracy,
    knn_predict,
    majority_rate,
    plot_embedding,
    transform,
)
from .sampling import sample_from_prior, save_interpolation, save_reconstructions, unit_to_uint8
from .training import CHECKPOINT_PREFIX, VAETrainLoop, resolve_resume_checkpoint

__all__ = [name for name in dir() if not name.startswith("_") and name not in
           ("networks", "pca", "sampling", "training")]
