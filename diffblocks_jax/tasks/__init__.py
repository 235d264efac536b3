"""Tasks: what is diffused and how it is scored (classification: the label embedding)."""
