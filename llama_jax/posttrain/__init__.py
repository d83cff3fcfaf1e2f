"""Post-training commands, each a module with a Python API and ``python -m llama_jax.posttrain.<name>``: average
(checkpoints' weighted mean), score (reward-model scores), rejection_sample (best of K), reference_logps (DPO's)."""
