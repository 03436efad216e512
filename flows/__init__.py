"""Prefect flows that chain the tasks into the seed README's workflow."""
