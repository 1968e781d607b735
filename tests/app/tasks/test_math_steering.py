"""The math task's pieces inside a sampler: a particle filter steers the tiny Qwen2 policy with
the tiny Qwen2.5-Math-PRM-format reward model through the host PRM scorer."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from tests.lm_folders import make_policy_folder, make_prm_folder  # noqa: E402
from tts_jax.app.tasks.math import answers as A  # noqa: E402
from tts_jax.app.tasks.math import prm_format as F  # noqa: E402
from tts_jax.app.tasks.math import prompting as P  # noqa: E402
from tts_jax.models.lm import load_lm  # noqa: E402
from tts_jax.models.lm_reward import load_reward_model  # noqa: E402
from tts_jax.samplers.lm import particle_filter  # noqa: E402
from tts_jax.samplers.lm.answers import extract_answers, select  # noqa: E402
from tts_jax.samplers.lm.scoring import host_scorer  # noqa: E402


def test_particle_filter_with_the_host_prm_scorer(tmp_path):
    policy, prm_folder = make_policy_folder(tmp_path / "policy"), make_prm_folder(tmp_path / "prm")
    policy_tok, prm_tok = P.load_tokenizer(policy), P.load_tokenizer(prm_folder)
    _, lm = load_lm(policy)
    _, prm = load_reward_model(prm_folder)
    settings = P.read_generation_settings(policy, policy_tok)
    scorer = host_scorer(F.prm_host_fn(policy_tok, prm_tok, prm))
    prompt = np.asarray(P.build_prompt(policy_tok, "What is $1 + 2$?"), np.int32)
    result = particle_filter.particle_filter(
        jax.random.key(0),
        lm,
        prompt,
        scorer,
        None,
        num_particles=2,
        max_steps=2,
        max_step_tokens=3,
        max_new_tokens=6,
        sep_id=F.step_separator_id(policy_tok),
        stop_ids=list(settings.stop_ids),
        pad_id=settings.pad_id,
    )
    rewards = np.asarray(result.rewards)
    assert np.isfinite(rewards).all() and ((rewards > 0) & (rewards < 1)).all()
    assert int(result.cost.reward_calls) > 0
    answers = extract_answers(result, lambda ids: A.completion_answer(policy_tok, ids))
    assert len(answers) == 2
    assert 0 <= select(result, A.majority, answers) < 2
