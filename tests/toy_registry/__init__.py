"""Out-of-tree registry entries for tests/test_registry.py (config ``plugins: [toy_registry.toy]``)."""
