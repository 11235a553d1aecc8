"""The stages' logic; the top-level scripts only parse arguments and call into here."""
