"""Tests of mlexp/tracking/."""
