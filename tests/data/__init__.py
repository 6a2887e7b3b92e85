"""Tests of mlexp/data/."""
