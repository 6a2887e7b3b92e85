"""Images in: sources (image folders, the built-in sets), splits and their digests, and each backbone's transforms."""
