"""Passes, TOML pipelines and the run that chains them."""
