"""Many runs: the grid's plan, the launcher that claims and supervises them, its progress, and the local and Ray executors."""
