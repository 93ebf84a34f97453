"""Cost model and effective filter analysis (gradient matrices, spectra, the limit)."""
