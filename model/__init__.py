"""Offline side of recstream: data loading, SASRec training, evaluation, export and indexing."""
