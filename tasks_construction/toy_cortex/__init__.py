"""The toy cortex: a procedurally generated movie world with simulated fMRI from a known encoding model.

It writes exactly the files and formats of the preprocessed cc2017 data (read by :mod:`utils.data`), so every stage
runs on it unchanged. Entry point: :func:`tasks_construction.toy_cortex.build.build_world` (called by
``download_dataset.py --toy``); the world's config and vocabulary are :mod:`utils.toy_world`.
"""
