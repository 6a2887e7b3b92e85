"""What is trained: the backbone catalogue, where weights come from and how a file loads into a model, and the fine-tuning strategies."""
