"""ctld: 3D latent diffusion for CT slice interpolation (thick 5 mm series in, thin 1 mm series out)."""

__version__ = "0.1.0"
