"""Tests of mlexp/training/."""
