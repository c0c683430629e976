"""ccr_jax: continual cross-modal retrieval with JAX/Flax dual encoders, Orbax snapshots and ScaNN indices."""
