"""Data quality: Great Expectations checkpoints at the pipeline's boundaries."""
