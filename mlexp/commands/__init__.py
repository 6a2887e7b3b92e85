"""The commands on top: the `mlexp` CLI, the options each command declares once, and the model commands (evaluate, register)."""
