"""lightning_sensorium: SENSORIUM 2023 mouse V1 video models on PyTorch Lightning."""

__version__ = "0.1.0"
