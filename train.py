"""Train a segmentation model: ``python train.py fit --config configs/synthetic.yaml``.

Same code as the ``segcam-train`` console script; ``python train.py --help`` lists every option.
"""

from segcam_lightning.cli import main

if __name__ == "__main__":
    main()
