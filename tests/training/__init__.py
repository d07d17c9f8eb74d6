"""Tests of training/: datasets, training, evaluation and the adapter registry."""
