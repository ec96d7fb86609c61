"""Face-recognition training support: datasets, backbones and verification."""
