"""One run, setup to finish: the loop, optimizer, recipes, records, checkpoints and resume, hardware, evaluation, logged models and what the run prints."""
