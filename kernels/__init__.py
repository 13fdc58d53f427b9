"""Pure JAX + Pallas kernels of tpu-plugin, installed as the import package ``tpu_kernels``.

This folder never imports vLLM or ``tpu_plugin``: each kernel is a function of arrays, so it can
be tested, tuned and benchmarked on its own. Every kernel has a pure-jnp ``reference.py`` that
is its specification; backend versions (``tpu.py``, ``gpu.py``) are tested against it.
"""
