"""Tensor-parallel partition tables of the shipped transformers (docs/design.md "Scale-out").

One table per architecture says, for every weight of the model, which of its axes is split over
the ``model`` axis of a device mesh (:func:`tts_jax.sharding.mesh`); :func:`shard_model` places
an NNX module (or its state) with those ``NamedSharding`` s, so no device holds a full copy of a
sharded weight; :func:`load_lm_sharded` / :func:`load_dit_sharded` (:func:`read_sharded`) load a
checkpoint straight into that layout, each device reading its own slices of the files, and
:func:`load_sharded` stages any other loader on the host and scatters. The particle axis
of the same mesh is for the particles (:func:`tts_jax.sharding.constrain_particles`); the
weights are replicated over it.

The split is Megatron-style tensor parallelism (Shoeybi et al. 2019, "Megatron-LM"): in every
attention block the query / key / value projections are *column-parallel* (their output
features, i.e. whole heads, are split), the output projection is *row-parallel* (its input
features are split and the partial products are summed across the axis); in every MLP the up /
gate projections are column-parallel and the down projection row-parallel. A device therefore
computes its own heads and its own slice of the hidden MLP features from replicated activations,
and one all-reduce per block joins them. The adaLN modulation heads of the diffusion
transformers (``6 D x D`` per block, as large as the attention) are row-parallel: their output
is a small ``[N, k D]`` vector, so the all-reduce is cheap. Token embeddings and the LM head are
split over the vocabulary (for Qwen2 the vocabulary matrix is a quarter of a 0.5B model). Small
parameters (norm scales, biases of row-parallel layers, patch embeddings, final projections to
pixels) are replicated.

A table is a value (:class:`PartitionTable`): ordered rules ``(regex on the dotted NNX path,
spec)``, the first match wins and an unmatched parameter is replicated; plus the counts that
must divide the model-axis size (the head counts), checked with a named error before anything
is placed. The placement itself never changes a result: the compiled program is the same
computation on a different layout, and XLA inserts the collectives (outputs equal the
unsharded ones up to float reassociation of the row-parallel sums,
``tests/test_model_sharding.py``).

Tables are looked up from the module's class (:func:`partition_table`); build your own
:class:`PartitionTable` for a new architecture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open

from tts_jax.models import checkpoint
from tts_jax.models.base import FlowModel
from tts_jax.sharding import MODEL_AXIS, PARTICLE_AXIS

M = MODEL_AXIS  # shorthand in the tables below


class Rule(NamedTuple):
    """One line of a table.

    Attributes:
        pattern: regular expression matched in full against the parameter's dotted NNX path
            (``"model.layers.0.self_attn.q_proj.weight"``).
        spec: per array axis, :data:`MODEL_AXIS` (split over the model axis) or ``None``.
    """

    pattern: str
    spec: tuple[str | None, ...]


class PartitionTable(NamedTuple):
    """How one architecture's weights split over the model axis.

    Attributes:
        name: the architecture (for messages).
        rules: ordered :class:`Rule` s; the first whose pattern matches a path gives its spec,
            a parameter no rule matches is replicated.
        divisible: ``(what, count)`` pairs that must be multiples of the model-axis size (head
            counts: a head is never split across devices).
    """

    name: str
    rules: tuple[Rule, ...]
    divisible: tuple[tuple[str, int], ...] = ()

    def spec(self, path: str, ndim: int) -> PartitionSpec:
        """The spec of the parameter at dotted ``path`` with ``ndim`` axes."""
        for rule in self.rules:
            if re.fullmatch(rule.pattern, path):
                if len(rule.spec) != ndim:
                    raise ValueError(
                        f"{self.name} partition table: rule {rule.pattern!r} gives "
                        f"{len(rule.spec)} axes for parameter {path!r} with {ndim}"
                    )
                return PartitionSpec(*rule.spec)
        return PartitionSpec()


def _column(prefix: str) -> tuple[Rule, ...]:
    """A Flax ``nnx.Linear`` (kernel ``[in, out]``) split over its output features."""
    return (Rule(prefix + r"\.kernel", (None, M)), Rule(prefix + r"\.bias", (M,)))


def _row(prefix: str) -> tuple[Rule, ...]:
    """A Flax ``nnx.Linear`` split over its input features (its bias is replicated)."""
    return (Rule(prefix + r"\.kernel", (M, None)),)


# --------------------------------------------------------------------------- the tables


def lm_table(config: Any, *, shard_vocab: bool = True, shard_kv: bool = True) -> PartitionTable:
    """Qwen2 / Llama (:mod:`tts_jax.models.lm.modules`; PyTorch layout, ``weight [out, in]``).

    Column-parallel ``q/k/v_proj`` and ``gate/up_proj``, row-parallel ``o_proj`` and
    ``down_proj``; with ``shard_vocab`` the embedding and LM head split over the vocabulary.
    Applies to anything with a :class:`~tts_jax.models.lm.modules.Backbone` (reward heads
    included).

    Args:
        config: the :class:`~tts_jax.models.lm.config.LMConfig`.
        shard_vocab: ``False`` replicates the embedding and the LM head (a vocabulary the model
            axis does not divide).
        shard_kv: ``False`` replicates ``k_proj`` / ``v_proj`` (grouped-query models with fewer
            KV heads than the model axis: every device then computes all KV heads, a small
            share of the attention, and only the query heads are split).
    """
    kv = "[qkv]" if shard_kv else "q"
    rules = (
        Rule(rf"(.*\.)?self_attn\.{kv}_proj\.weight", (M, None)),
        Rule(rf"(.*\.)?self_attn\.{kv}_proj\.bias", (M,)),
        Rule(r"(.*\.)?self_attn\.o_proj\.weight", (None, M)),
        Rule(r"(.*\.)?mlp\.(gate|up)_proj\.weight", (M, None)),
        Rule(r"(.*\.)?mlp\.(gate|up)_proj\.bias", (M,)),
        Rule(r"(.*\.)?mlp\.down_proj\.weight", (None, M)),
    )
    if shard_vocab:
        rules += (
            Rule(r"(.*\.)?embed_tokens\.weight", (M, None)),
            Rule(r"(.*\.)?lm_head\.weight", (M, None)),
        )
    counts = (("num_attention_heads", config.num_attention_heads),)
    if shard_kv:
        counts += (("num_key_value_heads", config.num_key_value_heads),)
    return PartitionTable("Qwen2/Llama", rules, counts)


def dit_table(config: Any) -> PartitionTable:
    """DiT (:mod:`tts_jax.models.dit`; Flax kernels ``[in, out]``).

    Per block: column-parallel ``to_q/k/v`` and ``ff.proj_in``, row-parallel ``to_out`` and
    ``ff.proj_out``; the adaLN head ``norm1.linear`` and ``proj_out_1`` row-parallel; the
    per-block timestep MLP split as a column/row pair and the class table over its features.
    """
    rules = (
        *_column(r"(.*\.)?attn1\.to_[qkv]"),
        *_row(r"(.*\.)?attn1\.to_out"),
        *_column(r"(.*\.)?ff\.proj_in"),
        *_row(r"(.*\.)?ff\.proj_out"),
        *_row(r"(.*\.)?norm1\.linear"),
        *_column(r"(.*\.)?timestep_embedder\.linear_1"),
        *_row(r"(.*\.)?timestep_embedder\.linear_2"),
        Rule(r"(.*\.)?class_embedder\.embedding_table\.embedding", (None, M)),
        *_row(r"proj_out_1"),
    )
    return PartitionTable("DiT", rules, (("num_attention_heads", config.num_attention_heads),))


def _mmdit_rules() -> tuple[Rule, ...]:
    """The blocks shared by SD3 and FLUX (:mod:`tts_jax.models.mmdit_layers`)."""
    return (
        *_column(r"(.*\.)?attn2?\.(to_[qkv]|add_[qkv]_proj)"),
        *_row(r"(.*\.)?attn2?\.(to_out|to_add_out)"),
        *_column(r"(.*\.)?ff(_context)?\.proj_in"),
        *_row(r"(.*\.)?ff(_context)?\.proj_out"),
        *_row(r"(.*\.)?norm(1|1_context|_out)?\.linear"),
        *_column(r"time_text_embed\.\w+\.linear_1"),
        *_row(r"time_text_embed\.\w+\.linear_2"),
        *_row(r"context_embedder"),
    )


def mmdit_table(config: Any, name: str = "MMDiT") -> PartitionTable:
    """SD3 / SD3.5 (:mod:`tts_jax.models.sd3`) and the shared MMDiT blocks: column-parallel
    ``to_q/k/v``, ``add_q/k/v_proj`` and ``ff(_context).proj_in``, row-parallel ``to_out``,
    ``to_add_out``, ``ff(_context).proj_out``, the adaLN heads and the text ``context_embedder``;
    the conditioning MLPs as column/row pairs."""
    return PartitionTable(
        name, _mmdit_rules(), (("num_attention_heads", config.num_attention_heads),)
    )


def flux_table(config: Any) -> PartitionTable:
    """FLUX (:mod:`tts_jax.models.flux`): :func:`mmdit_table` plus the single-stream blocks
    (column-parallel ``proj_mlp``, row-parallel ``proj_out`` over the concatenated attention and
    MLP features)."""
    rules = (
        *_column(r"single_transformer_blocks\.\d+\.proj_mlp"),
        *_row(r"single_transformer_blocks\.\d+\.proj_out"),
        *_mmdit_rules(),
    )
    return PartitionTable("FLUX", rules, (("num_attention_heads", config.num_attention_heads),))


def _registry() -> dict[type, Callable[[Any], PartitionTable]]:
    from tts_jax.models.dit import DiT
    from tts_jax.models.flux import FluxTransformer
    from tts_jax.models.lm.modules import LM
    from tts_jax.models.sd3 import SD3Transformer

    return {
        LM: lm_table,
        DiT: dit_table,
        FluxTransformer: flux_table,
        SD3Transformer: lambda c: mmdit_table(c, "SD3"),
    }


def partition_table(module: nnx.Module) -> PartitionTable:
    """The table of a shipped architecture, from the module's class and ``config``.

    Raises:
        ValueError: naming the class, for a module without a shipped table.
    """
    for cls, make in _registry().items():
        if isinstance(module, cls):
            return make(module.config)
    names = ", ".join(sorted(c.__name__ for c in _registry()))
    raise ValueError(
        f"no partition table for {type(module).__name__} (tables ship for {names}); pass a "
        "PartitionTable"
    )


# --------------------------------------------------------------------------- placement


def _model_size(mesh: Mesh) -> int:
    if MODEL_AXIS not in mesh.shape:
        raise ValueError(f"the mesh has axes {tuple(mesh.shape)}, no {MODEL_AXIS!r} axis")
    return mesh.shape[MODEL_AXIS]


def check_table(table: PartitionTable, mesh: Mesh) -> None:
    """Raises a ``ValueError`` naming the count when one of ``table.divisible`` is not a
    multiple of the mesh's model-axis size."""
    size = _model_size(mesh)
    for what, count in table.divisible:
        if count % size:
            raise ValueError(
                f"{table.name}: {what}={count} is not divisible by the {size} devices of mesh "
                f"axis {MODEL_AXIS!r} (heads are split whole over the model axis"
                + (
                    "; lm_table(config, shard_kv=False) replicates the KV heads)"
                    if what == "num_key_value_heads"
                    else ")"
                )
            )


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def state_shardings(
    state: nnx.State, mesh: Mesh, table: PartitionTable
) -> dict[str, NamedSharding]:
    """The ``NamedSharding`` of every variable of ``state``, by dotted path, checked.

    Raises:
        ValueError: a head count the model axis does not divide (:func:`check_table`), or a
            split axis of a parameter whose size the model axis does not divide (naming the
            parameter, its shape and the axis).
    """
    check_table(table, mesh)
    size = _model_size(mesh)
    out = {}
    for path, var in nnx.to_flat_state(state):
        name, shape = _dotted(path), tuple(np.shape(var.get_value()))
        spec = table.spec(name, len(shape))
        for axis, part in enumerate(spec):
            if part is not None and shape[axis] % size:
                raise ValueError(
                    f"{table.name}: parameter {name!r} of shape {shape} has axis {axis} of size "
                    f"{shape[axis]}, not divisible by the {size} devices of mesh axis "
                    f"{MODEL_AXIS!r}"
                )
        out[name] = NamedSharding(mesh, spec)
    return out


def shard_model(
    module_or_state: nnx.Module | nnx.State, mesh: Mesh, table: PartitionTable | None = None
) -> Any:
    """Place a model's weights on ``mesh``: split over its model axis as ``table`` says,
    replicated over the other axes.

    Args:
        module_or_state: an NNX module (returns a module with placed arrays) or its state
            (``nnx.split(module)[1]``; returns the placed state).
        mesh: a mesh with a :data:`MODEL_AXIS` axis (:func:`tts_jax.sharding.mesh`).
        table: the architecture's table (default :func:`partition_table` of the module; required
            for a bare state).

    Returns:
        The same kind of value, every array a ``jax.Array`` with a ``NamedSharding`` on
        ``mesh``. Results computed from it equal the unsharded ones (see the module docstring).

    Raises:
        ValueError: see :func:`state_shardings`; a state without a table.
    """
    if isinstance(module_or_state, nnx.Module):
        graphdef, state = nnx.split(module_or_state)
        table = partition_table(module_or_state) if table is None else table
        return nnx.merge(graphdef, _place(state, mesh, table))
    if table is None:
        raise ValueError("shard_model: pass the PartitionTable of a bare state")
    return _place(module_or_state, mesh, table)


def _place(state: nnx.State, mesh: Mesh, table: PartitionTable) -> nnx.State:
    shardings = state_shardings(state, mesh, table)
    flat = [
        (path, var.replace(jax.device_put(var.get_value(), shardings[_dotted(path)])))
        for path, var in nnx.to_flat_state(state)
    ]
    return nnx.from_flat_state(flat)


def _is_split(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], nnx.GraphDef)


def _known(module: nnx.Module) -> bool:
    return any(isinstance(module, cls) for cls in _registry())


def shard_params(tree: Any, mesh: Mesh) -> Any:
    """Place every shipped network found in ``tree`` (an NNX module, or an ``nnx.split`` pair
    ``(graphdef, state)``) with its :func:`partition_table`; other leaves are left as they are
    (a jitted program replicates them)."""

    def place(x):
        if isinstance(x, nnx.Module):
            return shard_model(x, mesh) if _known(x) else x
        if _is_split(x):
            graphdef, state = x
            module = nnx.merge(graphdef, state)
            if _known(module):
                return graphdef, shard_model(state, mesh, partition_table(module))
        return x

    return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, nnx.Module) or _is_split(x))


@dataclasses.dataclass(frozen=True)
class ParticleSplitApply:
    """A flow model's apply whose input particles are split over the mesh's particle axis.

    Every sampler calls the model on its particles, so constraining the model's input ``x [N,
    ...]`` to ``P("particles")`` is enough for XLA to keep the whole particle state split that
    way through the compiled loop; the network's weights stay split over the model axis. ``N``
    not divisible by the particle axis is left to the compiler. Static and hashable (the mesh
    and the inner apply), so rebuilding it never retraces.
    """

    inner: Callable[..., Any]
    mesh: Mesh

    def __call__(self, params, x, t, cond=None):
        size = self.mesh.shape.get(PARTICLE_AXIS, 1)
        if x.ndim and x.shape[0] % size == 0:
            spec = PartitionSpec(PARTICLE_AXIS, *([None] * (x.ndim - 1)))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))
        return self.inner(params, x, t, cond)


def shard_flow(flow: FlowModel, mesh: Mesh) -> FlowModel:
    """A :class:`~tts_jax.models.base.FlowModel` for a 2-D mesh: its networks' weights split
    over the model axis (:func:`shard_params`) and its particles over the particle axis
    (:class:`ParticleSplitApply`). Every image sampler runs it unchanged."""
    return FlowModel(
        shard_params(flow.params, mesh),
        ParticleSplitApply(flow.apply, mesh),
        flow.interpolant,
        flow.sample_shape,
    )


def load_sharded(load: Callable[[], Any], mesh: Mesh, table: PartitionTable | None = None) -> Any:
    """Run a loader on the host, then place the weights on ``mesh`` (:func:`shard_model`).

    ``load`` (e.g. ``lambda: load_dit(path)`` or ``lambda: load_lm(path, dtype=jnp.bfloat16)``)
    runs with the host CPU as default device, so the full weights exist only in host memory;
    each accelerator then receives only its slices. (On a CPU-only machine the host is device
    0, as it is for any run there.) The host copy is dropped when this returns.

    Args:
        load: returns a module, or a ``(config, module)`` pair as the shipped loaders do.
        mesh, table: as :func:`shard_model`.

    Returns:
        What ``load`` returns, with the module placed.
    """
    try:
        host = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend in this process: load on the default device
        host = None
    if host is None:
        loaded = load()
    else:
        with jax.default_device(host):
            loaded = load()
    if isinstance(loaded, tuple):
        config, module = loaded
        return config, shard_model(module, mesh, table)
    return shard_model(loaded, mesh, table)


def read_sharded(
    abstract: nnx.Module,
    files: checkpoint.WeightFiles,
    mesh: Mesh,
    table: PartitionTable,
    layout: checkpoint.Layout = checkpoint.IDENTITY,
    *,
    dtype: Any = None,
    ignore: Iterable[str] = (),
    ignore_suffixes: Sequence[str] = (),
) -> nnx.Module:
    """Fill an abstract module straight into its split layout: each device reads only its own
    slice of every tensor from the safetensors files (no full copy on any device, nor on the
    host).

    The names, file shapes and axis permutations are ``layout``'s and the checks those of
    :func:`tts_jax.models.checkpoint.load_params` (every parameter present with its shape, every
    tensor used unless ignored), done on the files' headers before anything is read.

    Args:
        abstract: ``nnx.eval_shape`` of the module.
        files: :func:`tts_jax.models.checkpoint.find_weights` of the folder.
        mesh, table: as :func:`shard_model`.
        layout: see :class:`~tts_jax.models.checkpoint.Layout`.
        dtype: parameter dtype (``None``: the abstract variable's).
        ignore, ignore_suffixes: tensors allowed to be unused.

    Raises:
        TensorMismatchError: naming every missing, mis-shaped and unexpected tensor.
        ValueError: see :func:`state_shardings`.
    """
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, table)
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(safe_open(str(f), framework="numpy")) for f in files.files]
        where = {name: handle for handle in opened for name in handle.keys()}
        flat, used, missing, misshaped = [], set(ignore), [], []
        for path, var in nnx.to_flat_state(state):
            name, spec = layout.name(path), var.get_value()
            want = layout.file_shape(path, spec.shape)
            used.add(name)
            if name not in where:
                missing.append((name, want))
                continue
            tensor = where[name].get_slice(name)
            if tuple(tensor.get_shape()) != want:
                misshaped.append((name, f"has shape {tuple(tensor.get_shape())}", str(want)))
                continue
            flat.append((path, var, tensor, np.dtype(spec.dtype if dtype is None else dtype)))
        unexpected = sorted(
            k for k in where if k not in used and not k.endswith(tuple(ignore_suffixes))
        )
        if missing or misshaped or unexpected:
            where_text = f"{files.loader}: the tensors of {files.source}"
            raise checkpoint.TensorMismatchError(where_text, missing, misshaped, unexpected)
        placed = []
        for path, var, tensor, want_dtype in flat:
            perm = layout._perm(path, len(var.get_value().shape))

            def read(index, path=path, tensor=tensor, perm=perm, want_dtype=want_dtype):
                file_index = index if perm is None else tuple(index[i] for i in perm)
                block = layout.from_file(path, np.asarray(tensor[file_index]))
                return np.ascontiguousarray(block.astype(want_dtype))

            shape = var.get_value().shape
            array = jax.make_array_from_callback(shape, shardings[_dotted(path)], read)
            placed.append((path, var.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(placed))


def load_lm_sharded(
    path: str | Path, mesh: Mesh, *, dtype: Any = None, table: PartitionTable | None = None
) -> tuple[Any, nnx.Module]:
    """:func:`tts_jax.models.lm.load_lm` straight into the split layout (:func:`read_sharded`;
    default table :func:`lm_table`, dtype float32)."""
    import jax.numpy as jnp

    from tts_jax.models.lm.checkpoint import _IGNORED_SUFFIXES
    from tts_jax.models.lm.config import CAUSAL_LM_ARCHITECTURES, read_lm_config
    from tts_jax.models.lm.modules import LM

    dtype = jnp.float32 if dtype is None else dtype
    _, config = read_lm_config(path, CAUSAL_LM_ARCHITECTURES.values(), loader="load_lm")
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0), dtype=dtype))
    ignore = ("lm_head.weight",) if config.tie_word_embeddings else ()
    files = checkpoint.find_weights(path, "load_lm")
    table = lm_table(config) if table is None else table
    model = read_sharded(
        abstract, files, mesh, table, dtype=dtype, ignore=ignore, ignore_suffixes=_IGNORED_SUFFIXES
    )
    return config, model


def load_dit_sharded(
    path: str | Path, mesh: Mesh, table: PartitionTable | None = None
) -> tuple[Any, nnx.Module]:
    """:func:`tts_jax.models.dit.load_dit` straight into the split layout (:func:`read_sharded`
    with the diffusers layout; default table :func:`dit_table`)."""
    from tts_jax.models import dit, dit_checkpoint

    config = dit.DiTConfig.from_dict(
        dit_checkpoint.read_config(path, dit.DiTConfig, required=("patch_size",))
    )
    abstract = nnx.eval_shape(lambda: dit.DiT(config, rngs=nnx.Rngs(0)))
    files = checkpoint.find_weights(
        path, "load_dit", dit_checkpoint.WEIGHTS_NAME, "only safetensors are supported"
    )
    layout = dit_checkpoint.diffusers_layout(dit._torch_key)
    table = dit_table(config) if table is None else table
    return config, read_sharded(abstract, files, mesh, table, layout, dtype=np.float32)


def device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays held on each device (from their addressable shards)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
