"""
Write scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 10 classes) as an
image folder that load_data reads, named "<label>_<index>.png" (see guided_diffusion.data.digits).

    python datasets/digits.py --out_dir data/digits --image_size 32
"""

from guided_diffusion.cli.main import run_main
from guided_diffusion.data.digits import main

if __name__ == "__main__":
    run_main(main)
