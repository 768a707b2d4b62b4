"""Builders of the small, seeded test models that the test suite and benchmarks run on."""
