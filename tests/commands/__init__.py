"""Tests of mlexp/commands/."""
