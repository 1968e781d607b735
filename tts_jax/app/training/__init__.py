"""Training of the embedded models (``tts-jax train MODEL``), one module per model.

Each module is also runnable as ``python -m tts_jax.app.training.<module>``; every one writes
into ``--out`` (default ``outputs/train/<model>``) and copies into the package's assets only with
``--install``. :data:`MODULES` maps the model names to the modules.
"""

MODULES = {
    "digits-dit": "tts_jax.app.training.digits_flow",
    "digits-classifiers": "tts_jax.app.training.digits_classifiers",
    "arith-tokenizer": "tts_jax.app.training.arith_tokenizer",
    "arith-lm": "tts_jax.app.training.arith_lm",
    "arith-prm": "tts_jax.app.training.arith_prm",
}
