"""Test configuration: x64 on, so tests pick float32 or float64 explicitly and upcasts show."""

import jax

jax.config.update("jax_enable_x64", True)
