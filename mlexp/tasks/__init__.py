"""What a task defines besides its backbone: its data format, its model around the backbone, its loss
components and metrics (detection's parts: tasks/detection)."""
