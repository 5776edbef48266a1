"""The evaluator's PyTorch InceptionV3: shapes, feature taps, preprocessing, weight loading."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.evaluation.inception import (
    InceptionV3,
    expected_state_dict_shapes,
    load_inception,
    pytorch_fid_preprocess,
    tf1_resize_bilinear,
)


def he_initialised_model(seed=0):
    """Random weights keeping activations O(1) through 94 conv layers (default init vanishes)."""
    torch.manual_seed(seed)
    model = InceptionV3()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.bias, 0.0, 0.1)
    nn.init.normal_(model.fc.weight, 0.0, 0.05)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model():
    return he_initialised_model()


@pytest.fixture(scope="module")
def batch_299():
    rng = np.random.default_rng(1)
    return torch.tensor(rng.integers(0, 256, size=(2, 299, 299, 3), dtype=np.uint8))


def test_feature_shapes_and_spatial_tap(model, batch_299):
    captured = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: captured.setdefault("out", output)
    )
    try:
        with torch.no_grad():
            pool, spatial = model(batch_299)
            logits = model.logits(pool)
    finally:
        hook.remove()
    assert pool.shape == (2, 2048)
    assert spatial.shape == (2, 2023)
    assert logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and pool.std() > 0
    # mixed_6/conv is Mixed_6d's 1x1 branch at 17x17; the reference takes [..., :7] of its NHWC
    # tensor and flattens, so the order is (h, w, c).
    tap = captured["out"]
    assert tap.shape == (2, 192, 17, 17)
    expected = tap.permute(0, 2, 3, 1)[..., :7].reshape(2, -1)
    torch.testing.assert_close(spatial, expected)
    assert spatial[0, 1].item() == tap[0, 1, 0, 0].item()
    assert spatial[0, 7].item() == tap[0, 0, 0, 1].item()


def test_logits_use_softmax_weights_without_bias(model):
    pool = torch.randn(3, 2048)
    saved_bias = model.fc.bias.detach().clone()
    with torch.no_grad():
        model.fc.bias.fill_(100.0)
        logits = model.logits(pool)
        model.fc.bias.copy_(saved_bias)
    expected = np.asarray(pool, dtype=np.float64) @ model.fc.weight.detach().double().numpy().T
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-4, atol=1e-4)


def tf1_resize_reference(image, out_h, out_w):
    """Per-pixel loop over TF1 ResizeBilinear (align_corners=False): src = dst * in / out."""
    in_h, in_w = image.shape
    out = np.zeros((out_h, out_w), dtype=np.float64)
    for i in range(out_h):
        y = i * (in_h / out_h)
        y0 = int(np.floor(y))
        y1 = min(y0 + 1, in_h - 1)
        for j in range(out_w):
            x = j * (in_w / out_w)
            x0 = int(np.floor(x))
            x1 = min(x0 + 1, in_w - 1)
            top = image[y0, x0] * (1 - (x - x0)) + image[y0, x1] * (x - x0)
            bottom = image[y1, x0] * (1 - (x - x0)) + image[y1, x1] * (x - x0)
            out[i, j] = top * (1 - (y - y0)) + bottom * (y - y0)
    return out


def test_tf1_resize_by_hand():
    # 1 x 2 -> 1 x 4: source x = 0, 0.5, 1, 1.5 (clamped to the last column).
    row = torch.tensor([[[[0.0, 10.0]]]])
    out = tf1_resize_bilinear(row, (1, 4))
    assert out.flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    # 3 -> 2 downsampling: source y = 0, 1.5.
    column = torch.tensor([[[[0.0], [4.0], [8.0]]]])
    assert tf1_resize_bilinear(column, (2, 1)).flatten().tolist() == [0.0, 6.0]


@pytest.mark.parametrize("in_size,out_size", [((5, 7), (9, 4)), ((32, 32), (299, 299))])
def test_tf1_resize_matches_loop(in_size, out_size):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=in_size).astype(np.float64)
    ours = tf1_resize_bilinear(torch.tensor(image, dtype=torch.float32)[None, None], out_size)
    expected = tf1_resize_reference(image, *out_size)
    np.testing.assert_allclose(ours[0, 0].numpy(), expected, atol=2e-3)
    # torch's half-pixel bilinear is a different resampling: make sure we are not using it.
    half_pixel = F.interpolate(
        torch.tensor(image, dtype=torch.float32)[None, None],
        size=out_size,
        mode="bilinear",
        align_corners=False,
    )
    assert (half_pixel - ours).abs().max() > 1.0


def test_preprocess_scale_and_identity_resize():
    images = torch.zeros(1, 299, 299, 3, dtype=torch.uint8)
    images[0, 0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    x = InceptionV3.preprocess(images)
    assert x.shape == (1, 3, 299, 299)
    assert x[0, :, 0, 0].tolist() == [-1.0, 0.0, 127 / 128]
    assert x[0, 0, 1, 1].item() == -1.0
    with pytest.raises(ValueError, match="NHWC"):
        InceptionV3.preprocess(torch.zeros(1, 3, 32, 32))


def half_pixel_resize_reference(image, out_h, out_w):
    """Per-pixel loop over bilinear with half-pixel centres: src = (dst + 0.5) * in / out - 0.5."""
    in_h, in_w = image.shape

    def taps(i, in_len, out_len):
        src = max((i + 0.5) * in_len / out_len - 0.5, 0.0)
        low = min(int(np.floor(src)), in_len - 1)
        return low, min(low + 1, in_len - 1), src - low

    out = np.zeros((out_h, out_w), dtype=np.float64)
    for i in range(out_h):
        y0, y1, fy = taps(i, in_h, out_h)
        for j in range(out_w):
            x0, x1, fx = taps(j, in_w, out_w)
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_pytorch_fid_preprocessing_is_its_scale_and_half_pixel_resize():
    # At 299 px no resampling happens: the only difference is 2x/255 - 1 against (x - 128)/128.
    images = torch.zeros(1, 299, 299, 3, dtype=torch.uint8)
    images[0, 0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    x = pytorch_fid_preprocess(images)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 2 * 128 / 255 - 1, 1.0], abs=1e-7)
    # Other sizes: bilinear with half-pixel centres, then the scale.
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, size=(1, 12, 9, 3), dtype=np.uint8)
    x = pytorch_fid_preprocess(torch.tensor(small))
    expected = half_pixel_resize_reference(small[0, :, :, 1].astype(np.float64), 299, 299)
    np.testing.assert_allclose(x[0, 1].numpy(), 2 * expected / 255 - 1, atol=1e-5)


def test_forward_is_features_of_the_chosen_preprocessing(model):
    images = torch.tensor(np.random.default_rng(6).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
    other = InceptionV3(preprocessing="pytorch-fid").eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for net, prepare in ((model, InceptionV3.preprocess), (other, pytorch_fid_preprocess)):
            pool, spatial = net(images)
            pool_direct, spatial_direct = model.features(prepare(images))
            assert torch.equal(pool, pool_direct) and torch.equal(spatial, spatial_direct)
        assert not torch.allclose(model(images)[0], other(images)[0])
    with pytest.raises(ValueError, match="unknown Inception preprocessing 'tf2'; choose one of tf1"):
        InceptionV3(preprocessing="tf2")


def test_state_dict_keys_are_the_pytorch_fid_layout():
    shapes = expected_state_dict_shapes()
    # torchvision's Inception3 without the aux head has 94 conv+BN units (5 tensors each) and fc.
    assert len(shapes) == 94 * 5 + 2
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6d.branch1x1.conv.weight"] == (192, 768, 1, 1)
    assert shapes["Mixed_6b.branch7x7dbl_2.conv.weight"] == (128, 128, 7, 1)
    assert shapes["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
    assert shapes["fc.weight"] == (1008, 2048)
    assert not any(key.startswith("AuxLogits") for key in shapes)


def test_load_round_trip_with_and_without_batch_counters(model, tmp_path):
    state = model.state_dict()
    with_counters = tmp_path / "with.pth"
    torch.save(state, with_counters)
    without_counters = tmp_path / "without.pth"
    stripped = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(stripped, without_counters)
    for path in (with_counters, without_counters):
        loaded = load_inception(str(path))
        assert not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())
        for key, value in loaded.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(value, state[key]), key


def test_load_rejects_wrong_files(model, tmp_path):
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}

    missing = dict(state)
    del missing["Mixed_6d.branch1x1.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"1 missing keys \(Mixed_6d.branch1x1.conv.weight\)"):
        load_inception(str(tmp_path / "missing.pth"))

    extra = dict(state, **{"AuxLogits.fc.weight": torch.zeros(1000, 768)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \(AuxLogits.fc.weight\)"):
        load_inception(str(tmp_path / "extra.pth"))

    wrong_shape = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    torch.save(wrong_shape, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"fc.weight is \(1000, 2048\), expected \(1008, 2048\)"):
        load_inception(str(tmp_path / "shape.pth"))

    (tmp_path / "graph.pb").write_bytes(b"\x0a\x05not a torch file")
    with pytest.raises(ValueError, match="not a PyTorch state dict"):
        load_inception(str(tmp_path / "graph.pb"))

    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_inception(str(tmp_path / "list.pth"))

    with pytest.raises(FileNotFoundError, match="--inception_path"):
        load_inception(str(tmp_path / "absent.pth"))
