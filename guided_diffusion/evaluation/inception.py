"""
InceptionV3 of the 2015-12-05 TensorFlow graph (``classify_image_graph_def.pb``) in PyTorch.

The reference evaluator of guided-diffusion runs that frozen TF graph and reads three tensors:

* ``pool_3:0`` -- the 2048-d global average pool, used for FID, precision and recall;
* ``mixed_6/conv:0`` -- the ReLU output of the 1x1 branch of the seventh mixed block. The graph
  numbers its mixed blocks ``mixed, mixed_1, ..., mixed_10``, which are torchvision's
  ``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c``; so ``mixed_6/conv`` is
  ``Mixed_6d.branch1x1`` (192 channels at 17x17). The reference keeps its first 7 channels and
  flattens them in NHWC order: 17 * 17 * 7 = 2023 features for sFID;
* ``softmax/logits/MatMul`` -- the pool features times the 2048x1008 softmax weights, *without*
  the bias, for the Inception Score.

The parameter names follow the published PyTorch conversion of that graph used by pytorch-fid
(``pt_inception-2015-12-05-6726825d.pth``), so that file loads directly. The graph's quirks are
kept: average pools inside the mixed blocks ignore the zero padding (TF ``SAME`` pooling), the
last block pools with max instead of average, batch norm uses eps=1e-3, and inputs are resized to
299x299 with TF1's legacy bilinear resize, then mapped to [-1, 1) by (x - 128) / 128.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION_SIZE = 299
NUM_POOL_FEATURES = 2048
NUM_LOGITS = 1008
# The reference keeps the first 7 of the 192 channels of mixed_6/conv.
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17
NUM_SPATIAL_FEATURES = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME,
)
HOW_TO_GET_WEIGHTS = (
    f"download {WEIGHTS_URLS[0]} (the pytorch-fid port of the 2015-12-05 TF Inception graph) "
    "and pass its path with --inception_path"
)


class ConvBNReLU(nn.Module):
    """
    A bias-free convolution, inference batch norm (eps=1e-3, as in the TF graph) and ReLU.

    :param in_channels: input channels.
    :param out_channels: output channels.
    :param kernel_size: int or (h, w).
    :param stride: convolution stride.
    :param padding: int or (h, w) zero padding.
    """

    def __init__(self, *, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        # The attribute names `conv` and `bn` are part of the weight file's key names.
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _same_avg_pool(x):
    # TF's SAME average pooling divides by the number of real pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class Mixed35(nn.Module):
    """
    35x35 mixed block (torchvision's InceptionA): 1x1, 5x5, double 3x3 and pooled branches.

    :param in_channels: input channels.
    :param pool_channels: output channels of the pooled branch.
    """

    def __init__(self, *, in_channels, pool_channels):
        super().__init__()
        self.branch1x1 = ConvBNReLU(in_channels=in_channels, out_channels=64, kernel_size=1)
        self.branch5x5_1 = ConvBNReLU(in_channels=in_channels, out_channels=48, kernel_size=1)
        self.branch5x5_2 = ConvBNReLU(in_channels=48, out_channels=64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = ConvBNReLU(in_channels=in_channels, out_channels=64, kernel_size=1)
        self.branch3x3dbl_2 = ConvBNReLU(in_channels=64, out_channels=96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(in_channels=96, out_channels=96, kernel_size=3, padding=1)
        self.branch_pool = ConvBNReLU(
            in_channels=in_channels, out_channels=pool_channels, kernel_size=1
        )

    def forward(self, x):
        five = self.branch5x5_2(self.branch5x5_1(x))
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pooled = self.branch_pool(_same_avg_pool(x))
        return torch.cat([self.branch1x1(x), five, double, pooled], dim=1)


class Reduction35to17(nn.Module):
    """
    Grid reduction 35x35 -> 17x17 (torchvision's InceptionB, the graph's ``mixed_3``).

    :param in_channels: input channels.
    """

    def __init__(self, *, in_channels):
        super().__init__()
        self.branch3x3 = ConvBNReLU(
            in_channels=in_channels, out_channels=384, kernel_size=3, stride=2
        )
        self.branch3x3dbl_1 = ConvBNReLU(in_channels=in_channels, out_channels=64, kernel_size=1)
        self.branch3x3dbl_2 = ConvBNReLU(in_channels=64, out_channels=96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(in_channels=96, out_channels=96, kernel_size=3, stride=2)

    def forward(self, x):
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pooled = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), double, pooled], dim=1)


class Mixed17(nn.Module):
    """
    17x17 mixed block with factorised 7x7 convolutions (torchvision's InceptionC).

    :param in_channels: input channels.
    :param mid_channels: width of the factorised 7x7 towers.
    """

    def __init__(self, *, in_channels, mid_channels):
        super().__init__()
        c = mid_channels
        row = dict(kernel_size=(1, 7), padding=(0, 3))
        col = dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBNReLU(in_channels=in_channels, out_channels=192, kernel_size=1)
        self.branch7x7_1 = ConvBNReLU(in_channels=in_channels, out_channels=c, kernel_size=1)
        self.branch7x7_2 = ConvBNReLU(in_channels=c, out_channels=c, **row)
        self.branch7x7_3 = ConvBNReLU(in_channels=c, out_channels=192, **col)
        self.branch7x7dbl_1 = ConvBNReLU(in_channels=in_channels, out_channels=c, kernel_size=1)
        self.branch7x7dbl_2 = ConvBNReLU(in_channels=c, out_channels=c, **col)
        self.branch7x7dbl_3 = ConvBNReLU(in_channels=c, out_channels=c, **row)
        self.branch7x7dbl_4 = ConvBNReLU(in_channels=c, out_channels=c, **col)
        self.branch7x7dbl_5 = ConvBNReLU(in_channels=c, out_channels=192, **row)
        self.branch_pool = ConvBNReLU(in_channels=in_channels, out_channels=192, kernel_size=1)

    def branches(self, x):
        """
        The four branch outputs, in concatenation order; the first is the graph's ``mixed_N/conv``.

        :param x: [N x C x 17 x 17] input.
        :return: a list of four [N x 192 x 17 x 17] tensors.
        """
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5
        ):
            double = layer(double)
        return [self.branch1x1(x), seven, double, self.branch_pool(_same_avg_pool(x))]

    def forward(self, x):
        return torch.cat(self.branches(x), dim=1)


class Reduction17to8(nn.Module):
    """
    Grid reduction 17x17 -> 8x8 (torchvision's InceptionD, the graph's ``mixed_8``).

    :param in_channels: input channels.
    """

    def __init__(self, *, in_channels):
        super().__init__()
        self.branch3x3_1 = ConvBNReLU(in_channels=in_channels, out_channels=192, kernel_size=1)
        self.branch3x3_2 = ConvBNReLU(in_channels=192, out_channels=320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = ConvBNReLU(in_channels=in_channels, out_channels=192, kernel_size=1)
        self.branch7x7x3_2 = ConvBNReLU(
            in_channels=192, out_channels=192, kernel_size=(1, 7), padding=(0, 3)
        )
        self.branch7x7x3_3 = ConvBNReLU(
            in_channels=192, out_channels=192, kernel_size=(7, 1), padding=(3, 0)
        )
        self.branch7x7x3_4 = ConvBNReLU(in_channels=192, out_channels=192, kernel_size=3, stride=2)

    def forward(self, x):
        three = self.branch3x3_2(self.branch3x3_1(x))
        seven = x
        for layer in (
            self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4
        ):
            seven = layer(seven)
        pooled = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([three, seven, pooled], dim=1)


class Mixed8(nn.Module):
    """
    8x8 mixed block with split 1x3 / 3x1 outputs (torchvision's InceptionE).

    :param in_channels: input channels.
    :param max_pool: pool the last branch with max instead of average. The 2015 graph does this in
        its final block (``mixed_10``), unlike the paper; the features depend on it.
    """

    def __init__(self, *, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBNReLU(in_channels=in_channels, out_channels=320, kernel_size=1)
        self.branch3x3_1 = ConvBNReLU(in_channels=in_channels, out_channels=384, kernel_size=1)
        self.branch3x3_2a = ConvBNReLU(
            in_channels=384, out_channels=384, kernel_size=(1, 3), padding=(0, 1)
        )
        self.branch3x3_2b = ConvBNReLU(
            in_channels=384, out_channels=384, kernel_size=(3, 1), padding=(1, 0)
        )
        self.branch3x3dbl_1 = ConvBNReLU(in_channels=in_channels, out_channels=448, kernel_size=1)
        self.branch3x3dbl_2 = ConvBNReLU(
            in_channels=448, out_channels=384, kernel_size=3, padding=1
        )
        self.branch3x3dbl_3a = ConvBNReLU(
            in_channels=384, out_channels=384, kernel_size=(1, 3), padding=(0, 1)
        )
        self.branch3x3dbl_3b = ConvBNReLU(
            in_channels=384, out_channels=384, kernel_size=(3, 1), padding=(1, 0)
        )
        self.branch_pool = ConvBNReLU(in_channels=in_channels, out_channels=192, kernel_size=1)

    def forward(self, x):
        t = self.branch3x3_1(x)
        three = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], dim=1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        double = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], dim=1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _same_avg_pool(x)
        return torch.cat([self.branch1x1(x), three, double, self.branch_pool(pooled)], dim=1)


def tf1_resize_bilinear(images, size):
    """
    Bilinear resize exactly as TF1's ``ResizeBilinear`` with align_corners=False (the op inside the
    2015 Inception graph): output pixel i samples input coordinate i * in / out, with no half-pixel
    shift, and the upper neighbour is clamped to the last row/column. torch's
    ``F.interpolate(..., align_corners=False)`` uses half-pixel centres and gives different values.

    :param images: float [N x C x H x W] tensor.
    :param size: output (height, width).
    :return: float [N x C x size[0] x size[1]] tensor.
    """
    out_h, out_w = size
    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return images

    def axis(in_len, out_len):
        # TF computes the scale and the source coordinates in float32.
        scale = torch.tensor(in_len / out_len, dtype=torch.float32)
        src = torch.arange(out_len, dtype=torch.float32) * scale
        low = src.floor().long()
        high = (low + 1).clamp(max=in_len - 1)
        frac = (src - low.float()).to(device=images.device, dtype=images.dtype)
        return low.to(images.device), high.to(images.device), frac

    # Same order of operations as the TF kernel: lerp along x within the top and bottom rows,
    # then along y between them.
    x_low, x_high, x_frac = axis(in_w, out_w)
    y_low, y_high, y_frac = axis(in_h, out_h)
    top, bottom = images[:, :, y_low, :], images[:, :, y_high, :]
    top = top[..., x_low] + (top[..., x_high] - top[..., x_low]) * x_frac
    bottom = bottom[..., x_low] + (bottom[..., x_high] - bottom[..., x_low]) * x_frac
    return top + (bottom - top) * y_frac[:, None]


def _nchw_float(images):
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC images with 3 channels, got shape {tuple(images.shape)}")
    return images.to(torch.float32).permute(0, 3, 1, 2)


def pytorch_fid_preprocess(images):
    """
    pytorch-fid's definition of the network input, for comparisons only (it is not the TF graph's):
    values divided by 255, resized to 299x299 with ``F.interpolate(mode="bilinear",
    align_corners=False)`` (half-pixel centres, unlike TF1's resize), then mapped by 2x - 1, so
    255 becomes 1.0 where the graph's (x - 128) / 128 gives 0.9921875.

    :param images: [N x H x W x 3] tensor, uint8 or float in [0, 255].
    :return: float32 [N x 3 x 299 x 299] tensor in [-1, 1].
    """
    x = _nchw_float(images) / 255.0
    # Same order as pytorch-fid: resize in [0, 1], then scale.
    x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


class InceptionV3(nn.Module):
    """
    The feature network of the reference evaluator (see the module docstring).

    forward(images) takes NHWC images with values in [0, 255] (uint8 or float), like the reference's
    ``ExpandDims:0`` input, and returns ``(pool, spatial)``: [N x 2048] pool features and
    [N x 2023] spatial features. ``logits(pool)`` gives the bias-free softmax logits.
    forward is ``features(preprocess(images))``; ``features`` takes the normalised 299x299 input,
    so any preprocessing can feed the same network.

    :param preprocessing: how images become the network input: "tf1" (default, the reference's
        graph: TF1 bilinear resize, then (x - 128) / 128) or "pytorch-fid" (pytorch-fid's
        definition: x / 255, ``F.interpolate`` bilinear resize, then 2x - 1; see
        ``pytorch_fid_preprocess``). Only "tf1" gives the reference's numbers; the other exists to
        show where pytorch-fid's FIDs differ (docs/evaluator.md).
    """

    def __init__(self, *, preprocessing="tf1"):
        super().__init__()
        if preprocessing not in PREPROCESSING:
            raise ValueError(
                f"unknown Inception preprocessing {preprocessing!r}; choose one of "
                + ", ".join(PREPROCESSING)
            )
        self.preprocessing = preprocessing
        self.Conv2d_1a_3x3 = ConvBNReLU(in_channels=3, out_channels=32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = ConvBNReLU(in_channels=32, out_channels=32, kernel_size=3)
        self.Conv2d_2b_3x3 = ConvBNReLU(in_channels=32, out_channels=64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = ConvBNReLU(in_channels=64, out_channels=80, kernel_size=1)
        self.Conv2d_4a_3x3 = ConvBNReLU(in_channels=80, out_channels=192, kernel_size=3)
        self.Mixed_5b = Mixed35(in_channels=192, pool_channels=32)
        self.Mixed_5c = Mixed35(in_channels=256, pool_channels=64)
        self.Mixed_5d = Mixed35(in_channels=288, pool_channels=64)
        self.Mixed_6a = Reduction35to17(in_channels=288)
        self.Mixed_6b = Mixed17(in_channels=768, mid_channels=128)
        self.Mixed_6c = Mixed17(in_channels=768, mid_channels=160)
        self.Mixed_6d = Mixed17(in_channels=768, mid_channels=160)
        self.Mixed_6e = Mixed17(in_channels=768, mid_channels=192)
        self.Mixed_7a = Reduction17to8(in_channels=768)
        self.Mixed_7b = Mixed8(in_channels=1280, max_pool=False)
        self.Mixed_7c = Mixed8(in_channels=2048, max_pool=True)
        self.fc = nn.Linear(NUM_POOL_FEATURES, NUM_LOGITS)

    @staticmethod
    def preprocess(images):
        """
        Map NHWC [0, 255] images to the normalised 299x299 NCHW input of the first convolution.

        :param images: [N x H x W x 3] tensor, uint8 or float in [0, 255].
        :return: float32 [N x 3 x 299 x 299] tensor in [-1, 1).
        """
        x = _nchw_float(images)
        x = tf1_resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
        return (x - 128.0) / 128.0

    def forward(self, images):
        return self.features(PREPROCESSING[self.preprocessing](images))

    def features(self, x):
        """
        The network after its input preprocessing.

        :param x: float32 [N x 3 x 299 x 299] normalised input (see ``preprocess``).
        :return: (pool [N x 2048], spatial [N x 2023]) features.
        """
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c
        ):
            x = block(x)
        parts = self.Mixed_6d.branches(x)
        # The reference slices mixed_6/conv in NHWC layout, so flatten as (h, w, c) to keep the
        # feature order of stored reference statistics (mu_s, sigma_s).
        spatial = parts[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = torch.cat(parts, dim=1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return pool, spatial

    def logits(self, pool):
        """
        Softmax logits of the graph's ``softmax/logits/MatMul``, which the reference reads: the
        pool features times the softmax weights, with no bias.

        :param pool: [N x 2048] pool features.
        :return: [N x 1008] logits.
        """
        return pool @ self.fc.weight.t()


# Input preprocessing by name (InceptionV3(preprocessing=...)).
PREPROCESSING = {"tf1": InceptionV3.preprocess, "pytorch-fid": pytorch_fid_preprocess}


def expected_state_dict_shapes(model=None):
    """
    :param model: an InceptionV3 to read the shapes from; a new one when None.
    :return: {key: shape} of the weight file the network expects (``num_batches_tracked`` excluded).
    """
    model = model if model is not None else InceptionV3()
    return {
        key: tuple(value.shape)
        for key, value in model.state_dict().items()
        if not key.endswith("num_batches_tracked")
    }


def _describe_keys(keys, limit=5):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_inception(path, *, device="cpu", preprocessing="tf1"):
    """
    Build the network and load a weight file, checking every key and shape.

    :param path: a PyTorch state dict with the pytorch-fid key names (see module docstring).
    :param device: where to put the network.
    :param preprocessing: see InceptionV3; "tf1" (the reference's) unless comparing with
        pytorch-fid.
    :return: the network in eval mode, without gradients.
    :raises FileNotFoundError: when the file does not exist.
    :raises ValueError: when the file is not a state dict of this network.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found at {path!r}: {HOW_TO_GET_WEIGHTS}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or unsafe file gets the same one-line advice
        raise ValueError(
            f"{path} is not a PyTorch state dict ({type(exc).__name__}); "
            f"the TF .pb graph and TorchScript files are not supported: {HOW_TO_GET_WEIGHTS}"
        ) from exc
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors: {HOW_TO_GET_WEIGHTS}")
    # BatchNorm's step counter is never used at inference; files with or without it both work.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = InceptionV3(preprocessing=preprocessing)
    expected = expected_state_dict_shapes(model)
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_describe_keys(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_describe_keys(unexpected)})")
        raise ValueError(
            f"{path} is not the 2015-12-05 Inception weight file: {'; '.join(parts)}. "
            f"{HOW_TO_GET_WEIGHTS}"
        )
    wrong = [k for k in expected if tuple(state[k].shape) != expected[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{path}: {len(wrong)} tensors have the wrong shape, e.g. {k} is "
            f"{tuple(state[k].shape)}, expected {expected[k]}. {HOW_TO_GET_WEIGHTS}"
        )
    model.load_state_dict(state, strict=False)
    model.eval().requires_grad_(False)
    return model.to(device)
