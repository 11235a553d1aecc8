"""Torch modules of NEURONS, each built from its config."""
