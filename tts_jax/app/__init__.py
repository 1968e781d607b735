"""The application layer: the ``tts-jax`` command line, presets, run and sweep records, plots,
demos, the arithmetic task and the bundled data loaders.

The library (particles, resampling, smc, interpolants, models, rewards, samplers, diagnostics)
never imports from here; this layer builds experiments out of it.
"""
