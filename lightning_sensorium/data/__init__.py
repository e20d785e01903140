"""Data layer: the official release layout, synthetic digital-twin mice, the zarr store and the loaders.

Dimension order is documented once, in :mod:`lightning_sensorium.data.layout`.
"""
