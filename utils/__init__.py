"""Helpers of the batch processor: retries, batch files, progress reporting, the embedded database."""
