"""Training: the published recipes, their data pipeline and loop."""
