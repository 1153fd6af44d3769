"""Code the tests share but the package does not ship: tiny random decoders, a tiny tfds builder.

Tests import it as `helpers` (pytest puts tests/ on sys.path, as for `from test_encode import ...`);
tfds needs its builder classes in an importable module, which tests/helpers/testing_builders.py is.
"""
