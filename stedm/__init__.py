"""STEDM: Style-Extracting Diffusion Models as a reproducible computational-pathology workflow."""

__version__ = "0.1.0"
