"""Data and annotation construction: toy cortex world, key objects, caches."""
