"""Tests of mlexp/models/."""
