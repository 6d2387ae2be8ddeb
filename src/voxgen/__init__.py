"""voxgen: generative models of 3D medical volumes."""

__version__ = "0.1.0"
