"""End-to-end tests: real `mlexp` processes, real MLflow servers, real trainings, and faults."""
