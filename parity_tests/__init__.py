"""Parity harness and the pytest matrix CI runs (``pytest --pyargs convnextv2.parity_tests``)."""
