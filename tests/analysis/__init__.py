"""Tests of mlexp/analysis/."""
