"""Plain helpers shared by every stage: config, I/O, manifests, run folders, errors."""
