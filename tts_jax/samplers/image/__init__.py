"""Steering methods for flow and diffusion models (docs/algorithms.md 1 to 3, 6.3, 6.4):
:mod:`.noise_search` (Ma et al. 2025), :mod:`.fk_steering` (Singhal et al. 2025),
:mod:`.flow_particles` (Kim et al. 2025), :mod:`.fk_correctors` (Skreta et al. 2025),
:mod:`.dlbs` (Oshima et al. 2025); ODE/SDE integration :mod:`.integrate`, and what the
search methods share: :mod:`.scaffold` (checks, scoring, results) and :mod:`.selection`."""
