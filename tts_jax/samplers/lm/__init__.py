"""Steering methods for language models (docs/algorithms.md 4): :mod:`.particle_filter`
(Puri et al. 2025), :mod:`.token_smc` (Lew et al. 2023), :mod:`.search` (best-of-N, beam search,
DVTS); the particle state :mod:`.state`, step scoring :mod:`.scoring` and answer selection
:mod:`.answers`."""
