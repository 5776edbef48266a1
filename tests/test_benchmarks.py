"""The benchmarks run with the tiny config on CPU and print one parseable JSON line per run; the
paper configs build the models of the reference README. The children see no GPU
(CUDA_VISIBLE_DEVICES=""): these are the CPU runs, wherever the tests run."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from _launch import child_env  # noqa: E402
from bench_configs import config_flags  # noqa: E402

from guided_diffusion.script_util import create_model_and_diffusion  # noqa: E402


def run_bench(name, args):
    env = child_env(cpu=True)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", name), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


def test_bench_train_tiny(tmp_path):
    runs = run_bench("bench_train.py", ["--config", "tiny", "--steps", "2", "--repeat", "2",
                                        "--log_dir", str(tmp_path)])
    assert len(runs) == 2
    for record in runs:
        assert record["bench"] == "train" and record["config"] == "tiny"
        assert record["samples_per_s"] > 0 and record["peak_mem_mb"] > 10
        assert record["samples_per_s"] == pytest.approx(4 / record["s_per_step"])


def test_bench_sample_tiny():
    (record,) = run_bench("bench_sample.py", ["--config", "tiny", "--timestep_respacing", "ddim5"])
    assert record["bench"] == "sample" and record["steps"] == 5 and record["use_ddim"] is True
    assert record["images_per_s"] == pytest.approx(4 / record["seconds"])
    assert record["peak_mem_mb"] > 10


def test_unknown_config_and_missing_gpu_are_one_line_errors():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench_sample.py"), "--device", "cuda"],
        env=child_env(cpu=True), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and result.stderr.strip() == "error: --device cuda but no GPU is visible"


@pytest.mark.parametrize(
    "name,released",
    [("adm64", "64x64_diffusion"), ("adm128", "128x128_diffusion"),
     ("adm256", "256x256_diffusion"), ("adm256_uncond", "256x256_diffusion_uncond"),
     ("adm512", "512x512_diffusion")],
)
def test_paper_configs_match_the_released_models(conformance, name, released):
    entry = json.loads((conformance / "manifest.json").read_text())[released]
    # Built on the meta device: shapes only, no memory or init time.
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**config_flags(name))
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
