"""LDMSeg: latent diffusion for panoptic segmentation and mask inpainting (arXiv 2401.10227).

This package is the method: numpy, torch, diffusers, Pillow. It never imports ``ray`` or
``mlflow``; the Ray shell lives in the ``pipelines`` package.
"""

__version__ = "0.1.0"
