"""
Every released checkpoint's state-dict layout, rebuilt from its published flags: the networks are
created on the meta device, so even the 500M-parameter models cost no memory or time.
"""

import argparse
import json

import pytest
import torch

from conftest import conformance_dir
from guided_diffusion import script_util

# Which reference script's defaults the flags of each kind are parsed with.
SCRIPT_FOR_KIND = {
    "unet": "image_sample",
    "sr": "super_res_sample",
    "classifier": "classifier_sample",
}

pytestmark = pytest.mark.usefixtures("single_thread")


def _names():
    path = conformance_dir()
    if path is None:
        return ["(conformance folder missing)"]
    return sorted(json.loads((path / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def manifest(conformance):
    return json.loads((conformance / "manifest.json").read_text())


@pytest.fixture(scope="module")
def script_defaults(conformance):
    return json.loads((conformance / "defaults.json").read_text())


def _parse(flags, defaults):
    parser = argparse.ArgumentParser()
    script_util.add_dict_to_argparser(parser, defaults)
    return parser.parse_args(flags.split())


def _build_on_meta(kind, args):
    with torch.device("meta"):
        if kind == "unet":
            keys = script_util.model_and_diffusion_defaults().keys()
            model, _ = script_util.create_model_and_diffusion(
                **script_util.args_to_dict(args, keys)
            )
        elif kind == "sr":
            keys = script_util.sr_model_and_diffusion_defaults().keys()
            model, _ = script_util.sr_create_model_and_diffusion(
                **script_util.args_to_dict(args, keys)
            )
        else:
            keys = script_util.classifier_defaults().keys()
            model = script_util.create_classifier(**script_util.args_to_dict(args, keys))
    return model


@pytest.mark.parametrize("name", _names())
def test_released_checkpoint_layout(name, manifest, script_defaults):
    entry = manifest[name]
    args = _parse(entry["flags"], script_defaults[SCRIPT_FOR_KIND[entry["kind"]]])
    model = _build_on_meta(entry["kind"], args)

    assert all(p.is_meta for p in model.parameters())
    got = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    expected = [[key, list(shape)] for key, shape in entry["state_dict"]]
    missing = [k for k, _ in expected if k not in dict(got)]
    unexpected = [k for k, _ in got if k not in dict(expected)]
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


def test_manifest_covers_every_kind(manifest):
    assert {entry["kind"] for entry in manifest.values()} == set(SCRIPT_FOR_KIND)
    # The 512x512 model exercises the fractional 0.5 channel multiplier.
    assert any("--image_size 512" in e["flags"] and e["kind"] == "unet" for e in manifest.values())
