"""The presets (`*.yaml` here) and `catalog`, which loads and validates them."""
