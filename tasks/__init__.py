"""Thin Prefect tasks around the library: content cache keys, retries and MLflow logging."""
