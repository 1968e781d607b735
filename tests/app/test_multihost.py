"""Multi-host runs: the process group starts from flags or the environment; a sweep split over
processes runs every unit exactly once and merges into one ``runs.jsonl``, also when a process
is killed and restarted; two real ``jax.distributed`` processes on localhost see each other, run
a sampler unchanged on the global mesh (equal to the single-process run), split a sweep, and
refuse to split grids that differ between them.

The split / kill / merge logic runs in-process on a fake task (explicit process groups); one pair
of subprocesses proves the real start."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tts_jax import distributed
from tts_jax.app import runs, sweeps
from tts_jax.distributed import ProcessGroup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRID = (("a", "b"), (1, 2), (0, 1, 2))  # methods x budgets x seeds: 12 units
VERSIONS = runs.identity_versions()


class Killed(Exception):
    """Stands for the process dying after some units."""


def fake_task(calls: list, die_after: int | None = None) -> sweeps.Task:
    """A task whose unit ``{"method", "budget", "seed"}`` records its own id and a value derived
    from it; ``calls`` collects every unit run; ``die_after`` units in it raises :class:`Killed`.
    """

    def plan(base, methods, budgets, seeds):
        return [
            sweeps.Unit({"method": m, "budget": b, "seed": s, **base})
            for m in methods
            for b in budgets
            for s in seeds
        ]

    def run(unit, bundle):
        if die_after is not None and len(calls) == die_after:
            raise Killed
        calls.append(unit.config)
        return {
            "config_id": runs.config_id(unit.config, VERSIONS),
            **unit.config,
            "value": unit.config["seed"],
        }

    return sweeps.Task(
        name="fake",
        plan=plan,
        shared=lambda base: dict(base),
        identity=lambda unit: unit.config,
        load=lambda units: None,
        check=lambda units, bundle: None,
        run=run,
    )


def planned_ids(base=None) -> list[str]:
    task = fake_task([])
    return [sweeps.unit_id(task, u, VERSIONS) for u in task.plan(base or {}, *GRID)]


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shares_partition_the_plan(n):
    ids = planned_ids()
    ids = ids + ids[:3]  # a repeated unit still has one owner
    shares = [sweeps.share(ids, ProcessGroup(i, n)) for i in range(n)]
    assert set().union(*shares) == set(ids)
    assert sum(len(s) for s in shares) == len(set(ids))  # disjoint
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced


# --------------------------------------------------------------------------- kill and restart


@pytest.mark.parametrize("restart", [ProcessGroup(1, 2), distributed.SINGLE])
def test_killed_process_restarts_into_one_merged_file(tmp_path, restart):
    """Process 1 dies after 2 units (and mid-write of a 3rd); process 0 finishes its share;
    process 1 restarted (or a single process resuming) runs only what is missing and merges:
    every unit exactly once in ``runs.jsonl``, with the ids of the plan."""
    ids = planned_ids()
    p0, p1 = ProcessGroup(0, 2), ProcessGroup(1, 2)
    calls1 = []
    with pytest.raises(Killed):
        sweeps.sweep(fake_task(calls1, die_after=2), {}, *GRID, tmp_path, progress=False, group=p1)
    shard1 = runs.shard_path(tmp_path, 1)
    with open(shard1, "a") as f:  # killed mid-write of its third unit
        f.write('{"config_id": "' + ids[5][:8])
    assert len(runs.read_jsonl(shard1)) == 2

    calls0 = []
    got0 = sweeps.sweep(fake_task(calls0), {}, *GRID, tmp_path, progress=False, group=p0)
    assert len(calls0) == 6 and len(got0) == 8  # its own 6 and process 1's 2
    assert not (tmp_path / "runs.jsonl").exists()  # incomplete: nothing merged yet

    calls = []
    got = sweeps.sweep(fake_task(calls), {}, *GRID, tmp_path, progress=False, group=restart)
    assert len(calls) == 4  # only process 1's missing units, the half-written one included
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    merged = [json.loads(line) for line in lines]
    assert sorted(r["config_id"] for r in merged) == sorted(ids)  # each unit once, none lost
    assert [r["config_id"] for r in got] == [r["config_id"] for r in merged]
    for r in merged:  # each record is the run of the unit its id names
        config = {k: r[k] for k in ("method", "budget", "seed")}
        assert r["config_id"] == runs.config_id(config, VERSIONS) and r["value"] == r["seed"]
    # The other shard was never written by process 1, nor shard 1 by process 0.
    assert {r["config_id"] for r in runs.read_jsonl(runs.shard_path(tmp_path, 0))} == (
        sweeps.share(ids, p0)
    )

    # Resuming with any number of processes runs nothing and leaves the merged file as it is.
    for group in (distributed.SINGLE, ProcessGroup(2, 3)):
        again = []
        sweeps.sweep(fake_task(again), {}, *GRID, tmp_path, progress=False, group=group)
        assert again == []
    assert (tmp_path / "runs.jsonl").read_text().splitlines() == lines


def test_folder_of_another_configuration_is_refused_with_shards(tmp_path):
    sweeps.sweep(fake_task([]), {}, *GRID, tmp_path, progress=False, group=ProcessGroup(0, 2))
    with pytest.raises(ValueError, match="another configuration"):
        sweeps.sweep(fake_task([]), {"lam": 2}, *GRID, tmp_path, group=ProcessGroup(1, 2))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"runs\.p0\.jsonl\) without a recorded"):
        sweeps.sweep(fake_task([]), {}, *GRID, tmp_path, group=ProcessGroup(1, 2))


def test_bad_process_group_is_refused(tmp_path):
    with pytest.raises(ValueError, match="process id 2 is outside 0 .. 1"):
        sweeps.sweep(fake_task([]), {}, *GRID, tmp_path, group=ProcessGroup(2, 2))


# --------------------------------------------------------------------------- starting the group


def test_resolve_reads_flags_then_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve(environ={}) is None  # nothing asked: one process
    assert distributed.resolve(num_processes=1, environ={"JAX_COORDINATOR_ADDRESS": "h:1"}) is None
    assert distributed.resolve(environ=env) == ("h:1", 4, 3)
    assert distributed.resolve("c:2", 2, 0, environ=env) == ("c:2", 2, 0)
    assert distributed.resolve(num_processes=8, environ={}) == (None, 8, None)  # cluster fills
    with pytest.raises(ValueError, match="process id 4 is outside 0 .. 3"):
        distributed.resolve(process_id=4, environ=env)
    with pytest.raises(ValueError, match="at least 1"):
        distributed.resolve(num_processes=0, environ={})
    with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.resolve(environ={"JAX_NUM_PROCESSES": "two"})
    assert distributed.initialize(environ={}) == distributed.SINGLE  # the no-op default


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "tests/app")
    from tts_jax import distributed
    pid = int(sys.argv[1])
    # process 0 from the environment, process 1 from explicit settings
    group = (distributed.initialize() if pid == 0
             else distributed.initialize(sys.argv[2], 2, 1))
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    assert group == (pid, 2) and jax.process_count() == 2, (group, jax.process_count())
    assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2

    # A sampler unchanged on the global mesh (4 devices over 2 processes) equals the local run.
    from tts_jax import smc
    from tts_jax.models import gmm as G
    from tts_jax.sharding import particle_mesh, shard_particles
    from tests.test_smc import tempered_propagate, tempered_log_potential, NUM_TEMPER_STEPS
    gmm = G.asymmetric_gmm_2d()
    x0 = jax.random.normal(jax.random.key(1), (64, 2))
    schedule = smc.ResampleSchedule(jnp.ones(NUM_TEMPER_STEPS, bool), jnp.float32(0.7))
    params = {"gmm": gmm, "lam": jnp.float32(1.5)}
    args = (tempered_propagate, tempered_log_potential, schedule, params)
    plain = smc.run(jax.random.key(0), x0, *args)
    mesh = particle_mesh()
    assert mesh.devices.size == 4
    sharded = smc.run(jax.random.key(0), shard_particles(np.asarray(x0), mesh), *args)
    gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
    np.testing.assert_allclose(gather(sharded.particles.state), plain.particles.state,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(gather(sharded.info.ancestors), plain.info.ancestors)
    np.testing.assert_allclose(gather(sharded.log_evidence), plain.log_evidence, rtol=1e-5)

    # The sweep splits its grid over the group; every process returns every record.
    from test_multihost import GRID, fake_task
    from tts_jax.app import sweeps
    calls = []
    got = sweeps.sweep(fake_task(calls), {}, *GRID, sys.argv[3], progress=False)
    assert len(calls) == 6 and len(got) == 12, (len(calls), len(got))
    # Processes started with different grids are stopped before anything runs.
    import os
    other = sys.argv[3] + "-other"
    seeds = GRID[2] + ((3,) if pid else ())
    try:
        sweeps.sweep(fake_task([]), {}, GRID[0], GRID[1], seeds, other, progress=False)
    except ValueError as err:
        assert "processes [1] hold another value than process 0" in str(err), err
    else:
        raise AssertionError("processes with different grids were accepted")
    assert not os.path.exists(other)
    print("MULTIHOST-OK", pid)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_real_processes(tmp_path):
    address = f"localhost:{_free_port()}"
    out = tmp_path / "sweep"
    # 2 host devices per process; unoptimised compiles (both runs compared get the same flags).
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    base_env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {flags}",
        JAX_PLATFORMS="cpu",
    )
    envs = [
        dict(
            base_env,
            JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID="0",
        ),
        base_env,
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(i), address, str(out)],
            cwd=ROOT,
            env=envs[i],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for i, (p, (stdout, stderr)) in enumerate(zip(procs, results, strict=True)):
        assert p.returncode == 0 and f"MULTIHOST-OK {i}" in stdout, stderr[-4000:]
    merged = runs.read_jsonl(out / "runs.jsonl")
    assert sorted(r["config_id"] for r in merged) == sorted(planned_ids())
    assert len((out / "runs.jsonl").read_text().splitlines()) == 12


# --------------------------------------------------------------------------- the command line


def test_sweep_command_starts_the_group_and_only_process_0_reports(tmp_path, monkeypatch, capsys):
    from tts_jax.app import cli

    started, swept = [], []

    def initialize(*settings):
        started.append(settings)
        return ProcessGroup(1, 2)

    def sweep(base, methods, budgets, seeds, out_dir):
        swept.append((base.model, methods, budgets, seeds, out_dir))
        return []

    monkeypatch.setattr(cli.distributed, "initialize", initialize)
    monkeypatch.setattr(cli.experiment, "sweep", sweep)
    argv = ["sweep", "gmm-fk", "--budgets", "100", "--seeds", "0", "1", "--out-dir", str(tmp_path)]
    cli.main([*argv, "--num-processes", "2", "--process-id", "1", "--coordinator", "h:1"])
    assert started == [("h:1", 2, 1)]  # the group options are not refused as preset options
    assert swept == [("gmm", ["fk"], [100], [0, 1], str(tmp_path))]
    assert "process 1 of 2: done" in capsys.readouterr().out  # no table, no plot
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="process id 2 is outside 0 .. 1"):
        cli.main([*argv, "--num-processes", "2", "--process-id", "2"])
