"""Parallelism beyond what the sharding rules give: pipeline.py runs the block stack as a pipeline over the mesh's
``pipeline`` axis (GPipe and circular schedules). The mesh and its rules table live in ``llama_jax.sharding``."""
