"""csps.parallel (placeholder in this commit)."""
