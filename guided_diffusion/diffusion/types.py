"""What the model predicts, how its variance is chosen, and which loss trains it."""

import enum


class ModelMeanType(enum.Enum):
    """Which quantity the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise that was added


class ModelVarType(enum.Enum):
    """
    How the reverse-process variance is obtained.

    LEARNED_RANGE is the interpolation of Nichol & Dhariwal (2021), eq. 15: the model outputs
    v in [-1, 1] and the log-variance is interpolated between the posterior variance and beta_t.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # plain MSE, plus the vb term when the variance is learned
    RESCALED_MSE = enum.auto()  # the same, with the vb term scaled as for RESCALED_KL
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # the bound times T, to be on the scale of the MSE loss

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)
