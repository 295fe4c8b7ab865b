"""Benchmarks of recstream: encoder and index micro-benchmarks, and the end-to-end run."""
