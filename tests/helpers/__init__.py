"""Code the tests and benchmarks share (test modules import from here, never from each other;
`tests/test_layout.py` checks it). The shared worlds built from it are the session
fixtures in `tests/conftest.py`."""
