"""Performance regressions that need no clock (issue #9).

* A stream of ``forward_backward`` / ``optim_step`` calls whose shapes vary within one bucket compiles
  each train entry point once, a new bucket adds exactly one program, and steady-state steps lower
  nothing at all (no stray eager op recompiling per call).
* No program jtinker compiles for training or sampling calls back into the host (``pure_callback``,
  ``io_callback``, ``jax.debug.print``/``callback``, host send/recv, in/outfeed): a callback serialises
  the device with Python on every step.
* ``import jtinker`` sets glibc's allocator up for XLA:CPU (``jtinker/hostmem.py``), unless opted out,
  and its XLA:CPU flags (``jtinker/xlaflags.py``) while no backend has started; XLA compiles with them.
* Decode reads the KV cache in place (no per-step copy of a layer's slice, no written-out score
  products), and prefill scores the prompt once, with the causal kernel (no masked scores over the
  empty cache).
* A bf16 model's training step multiplies in XLA:CPU's native bf16 kernels: no product is widened
  to f32 operands.
* The several-adapter step computes each layer's SwiGLU output once, like the one-adapter step.

Every program JAX lowers while a test runs is captured as StableHLO text through ``jax_dump_ir_to``,
so the checks see exactly what the engine compiles. The tiny model has a config no other test uses
(``rms_norm_eps``), so the process-wide jit caches cannot hold its programs already and each one is
lowered, and seen, here.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

import jtinker as tinker
from jtinker import batching, losses, sampling, train
from jtinker.models import KVCache, load_pretrained, make_tiny
from jtinker.models import lora as lora_lib
from jtinker.sampling import Sampler, SampleRequest, _first, _grow, _Rows, _start

UNIQUE_CONFIG = {"rms_norm_eps": 1.5e-6}  # no other test's model has it: fresh jit cache entries
ADAM = tinker.AdamParams(learning_rate=1e-3)

_CUSTOM_CALL = re.compile(
    r'custom_call\s*@([\w.$-]+)|call_target_name\s*=\s*"([^"]+)"|custom_call_target="([^"]+)"'
)
_HOST_TRANSFER = re.compile(
    r"\bstablehlo\.(?:send|recv|infeed|outfeed)\b|\s(?:send|recv|infeed|outfeed)(?:-done)?\(|"
    r"is_host_transfer\s*=\s*true"
)


def host_callbacks(ir: str) -> list[str]:
    """Host round trips in StableHLO or compiled-HLO text: custom calls whose target is a Python
    callback (``xla_ffi_python_cpu_callback``, ``xla_python_gpu_callback``, ...), host send/recv and
    in/outfeed (the legacy ``host_callback``)."""
    found = []
    for match in _CUSTOM_CALL.finditer(ir):
        target = next(group for group in match.groups() if group)
        if "callback" in target.lower():
            found.append(target)
    return found + [m.group(0).strip() for m in _HOST_TRANSFER.finditer(ir)]


# --------------------------------------------------------------------------------------------------
# The checker itself: a deliberately callback-ful program must be flagged


def _pure(x):
    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1


def _io(x):
    return io_callback(np.cos, jax.ShapeDtypeStruct(x.shape, x.dtype), x, ordered=True)


def _debug_print(x):
    jax.debug.print("x = {}", x)
    return x * 2


def _debug_callback(x):
    jax.debug.callback(lambda v: None, x)
    return x + 1


@pytest.mark.parametrize("fn", [_pure, _io, _debug_print, _debug_callback])
def test_checker_flags_host_callbacks(fn):
    lowered = jax.jit(fn).lower(jnp.ones(3))
    assert host_callbacks(lowered.as_text())
    assert host_callbacks(lowered.compile().as_text())


def test_checker_passes_a_plain_program():
    lowered = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(-1)).lower(jnp.ones((4, 4)))
    assert host_callbacks(lowered.as_text()) == []
    assert host_callbacks(lowered.compile().as_text()) == []


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("perf") / "qwen3", family="qwen3", size="tiny", **UNIQUE_CONFIG)


class IRDump:
    """Every module JAX lowers while the fixture is active, as ``{file name: StableHLO text}``."""

    def __init__(self, path: Path):
        self.path = path

    def files(self) -> set[str]:
        return {p.name for p in self.path.iterdir()}

    def read(self, names) -> dict[str, str]:
        return {name: (self.path / name).read_text() for name in names}


@pytest.fixture(scope="module")
def ir_dump(tmp_path_factory):
    path = tmp_path_factory.mktemp("ir")
    previous = jax.config.values["jax_dump_ir_to"]
    jax.config.update("jax_dump_ir_to", str(path))  # global, so the engine's worker thread dumps too
    try:
        yield IRDump(path)
    finally:
        jax.config.update("jax_dump_ir_to", previous)


def test_dump_sees_a_callback_program(ir_dump):
    """The capture path itself can fail: a callback-ful jit lowered now is dumped and flagged."""
    before = ir_dump.files()
    jax.jit(_pure)(jnp.ones(5)).block_until_ready()  # dumped when compiled
    new = ir_dump.read(ir_dump.files() - before)
    assert any("_pure" in name and host_callbacks(text) for name, text in new.items())


def _datum(n: int, rng: np.random.Generator, **extra) -> tinker.Datum:
    seq = rng.integers(0, 256, n + 1)
    inputs = {"target_tokens": seq[1:].astype(np.int64), "weights": np.ones(n, np.float32), **extra}
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(seq[:-1].tolist()), loss_fn_inputs=inputs)


def _flagged(programs: dict[str, str]) -> dict[str, list[str]]:
    return {name: found for name, text in programs.items() if (found := host_callbacks(text))}


# --------------------------------------------------------------------------------------------------
# Training


def test_train_step_compiles_once_per_bucket_and_has_no_host_callbacks(model_dir, ir_dump, tmp_path):
    start = ir_dump.files()
    service = tinker.ServiceClient(store_dir=str(tmp_path))
    training = service.create_lora_training_client(str(model_dir), rank=4, seed=0)
    steps = training._adapter.steps  # shared by every adapter of this layout on this base model
    rng = np.random.default_rng(0)

    def step(lengths):
        fb = training.forward_backward([_datum(n, rng) for n in lengths], "cross_entropy")
        training.optim_step(ADAM).result()
        assert np.isfinite(fb.result().metrics["loss:sum"])

    # Bucket A: 7-8 datums of 17-24 tokens; none fit two to a row, so always [8 rows, 24 tokens].
    step([24, 17, 20, 19, 18, 22, 21, 23])
    warm = ir_dump.files()
    for lengths in ([17, 18, 19, 20, 21, 22, 23, 24], [21, 22, 23, 17, 19, 24, 20]):
        step(lengths)
    assert steps.compile_count("accumulate") == 1
    assert steps.compile_count("optim_update") == 1
    assert ir_dump.files() == warm, "steady-state steps in one bucket lowered new programs"

    # Bucket B: 25-32 tokens -> rows of 32. One more forward_backward program; optim_step is shape-free.
    step([30, 25, 32, 27, 28, 26, 31, 29])
    warm = ir_dump.files()
    step([26, 31, 29, 25, 32, 30, 27])
    assert steps.compile_count("accumulate") == 2
    assert steps.compile_count("optim_update") == 1
    assert ir_dump.files() == warm

    programs = ir_dump.read(ir_dump.files() - start)
    names = " ".join(programs)
    assert "jit_accumulate" in names and "jit_optim_update" in names, sorted(programs)
    assert _flagged(programs) == {}


@pytest.mark.parametrize("loss_name", sorted(losses.LOSSES))
def test_train_programs_lower_without_host_callbacks(model_dir, loss_name):
    """``train.accumulate`` for every built-in loss, and ``optim_update``, lowered directly."""
    config, params = load_pretrained(model_dir)
    lora = lora_lib.init(config, 4, jax.random.key(0), targets=lora_lib.targets_for(True, True, True))
    rng = np.random.default_rng(1)
    rl = {
        "logprobs": rng.normal(-2.0, 0.5, 12).astype(np.float32),
        "advantages": rng.normal(0.0, 1.0, 12).astype(np.float32),
    }
    if loss_name == "gspo":
        rl["sequence_ratio_mask"] = (np.arange(12) >= 4).astype(np.float32)
    extra = rl if loss_name != "cross_entropy" else {}
    data = [_datum(12, rng, **extra) for _ in range(2)]
    if loss_name != "cross_entropy":
        for d in data:
            d.loss_fn_inputs.pop("weights")
    loss_fn, loss_config = losses.resolve(loss_name, {"beta": 0.1} if loss_name == "dro" else None)
    [(_, host)] = batching.build_batches(data, loss_name, config)
    accumulate = jax.jit(functools.partial(train.accumulate, config=config, loss_fn=loss_fn, remat=False))
    grads = jax.tree.map(jnp.zeros_like, lora)
    args = (grads, lora, params, host.batch, {k: jnp.float32(v) for k, v in loss_config.items()})
    assert host_callbacks(accumulate.lower(*args).as_text()) == []
    if loss_name == "cross_entropy":  # and the optimizer update, lowered and compiled (it is small)
        opt_state = train.optimizer().init(lora)
        update = jax.jit(train.optim_update).lower(lora, opt_state, grads, train.AdamHyperparams.create())
        assert host_callbacks(update.as_text()) == []
        assert host_callbacks(update.compile().as_text()) == []


_DOT = re.compile(r"= \w+\[[\d,]*\]\S* dot\(%([\w.-]+), %([\w.-]+)\), lhs_contracting_dims=\{(\d+)\}")
_DEFINITION = re.compile(r"%([\w.-]+) = (\w+)\[([\d,]*)\]")


def widened_products(hlo: str, skip_contracting: int) -> list[str]:
    """Matrix products in compiled HLO whose operands are f32 where the program's were bf16: XLA:CPU
    widens a bf16 product its native kernels cannot take. Those contracting ``skip_contracting``
    (the vocabulary: the head's f32 backward by design) are left out."""
    shapes = {
        name: (dtype, [int(d) for d in dims.split(",") if d])
        for name, dtype, dims in _DEFINITION.findall(hlo)
    }
    widened = []
    for lhs, rhs, contracting in _DOT.findall(hlo):
        (lhs_type, lhs_dims), (rhs_type, _) = shapes[lhs], shapes[rhs]
        if (
            len(lhs_dims) == 2
            and lhs_dims[int(contracting)] != skip_contracting
            and "f32" in (lhs_type, rhs_type)
        ):
            widened.append(f"{lhs_type}{lhs_dims} x {rhs_type}")
    return widened


def test_bf16_training_multiplies_in_bf16(model_dir):
    """Every matrix product of a bf16 model's LoRA step keeps bf16 operands (with an f32 result):
    XLA:CPU's native bf16 kernels then run it (AVX512-BF16, about 1.8x its f32 rate). A transpose
    folded into a product, a transposed operand still laid out as the transpose, or a bf16 result
    each made XLA:CPU widen both operands to f32 first; the step ran slower than in f32."""
    config, params = load_pretrained(model_dir, dtype=jnp.bfloat16)
    lora = lora_lib.init(config, 4, jax.random.key(0), targets=lora_lib.targets_for(True, True, True))
    rng = np.random.default_rng(2)
    [(_, host)] = batching.build_batches([_datum(12, rng) for _ in range(2)], "cross_entropy", config)
    loss_fn, loss_config = losses.resolve("cross_entropy", None)
    accumulate = jax.jit(functools.partial(train.accumulate, config=config, loss_fn=loss_fn, remat=False))
    grads = jax.tree.map(jnp.zeros_like, lora)
    args = (grads, lora, params, host.batch, {k: jnp.float32(v) for k, v in loss_config.items()})
    hlo = accumulate.lower(*args).compile().as_text()
    assert len(_DOT.findall(hlo)) > 10  # the parser sees the step's products
    assert widened_products(hlo, skip_contracting=config.vocab_size) == []


_LOOP_FUSION = re.compile(r"= \w+\[([\d,]*)\]\S* fusion\([^\n]*kind=kLoop[^\n]*")


def forward_layer_arrays(hlo: str, shape_tail: int, elements: int) -> int:
    """Elementwise fusions of the forward layer scan (not the backward's) making an array of
    ``elements`` values whose last dimension is ``shape_tail``."""
    count = 0
    for match in _LOOP_FUSION.finditer(hlo):
        dims = [int(d) for d in match.group(1).split(",") if d]
        line = match.group(0)
        if dims and dims[-1] == shape_tail and np.prod(dims) == elements:
            count += "while/body" in line and "transpose(" not in line
    return count


def test_several_adapters_compute_each_mlp_input_once(tmp_path):
    """In the several-adapter step (``vmap`` over adapters) the shared base product reads the SwiGLU
    output as ``[K * rows, I]`` and each adapter's LoRA product as ``[K, rows, I]``. When both were
    reshapes of the ``[K, B, T, I]`` value, XLA computed SwiGLU once for each (4 clients' step: 4%
    slower). It must run once per layer, as in the one-adapter step over the same rows."""
    intermediate = 96  # no other array of the tiny model ends in 96
    config, params = load_pretrained(
        make_tiny(tmp_path / "qwen3", family="qwen3", size="tiny", intermediate_size=intermediate)
    )
    loss_fn, _ = losses.resolve("cross_entropy", None)
    rng = np.random.default_rng(3)
    k, per_adapter = 2, 2
    hosts = [
        batching.build_batches([_datum(8, rng) for _ in range(per_adapter)], "cross_entropy", config)[0][1]
        for _ in range(k)
    ]
    loras = tuple(
        lora_lib.init(config, 4, jax.random.key(i), targets=lora_lib.targets_for(True, True, False))
        for i in range(k)
    )
    grads = tuple(jax.tree.map(jnp.zeros_like, lora) for lora in loras)
    static = {"config": config, "loss_fn": loss_fn, "remat": False}
    many = jax.jit(functools.partial(train.accumulate_many, **static))
    batch = jax.tree.map(lambda *xs: np.stack(xs), *[h.batch for h in hosts])
    many_hlo = many.lower(grads, loras, params, batch, {}, jnp.ones(k, bool)).compile().as_text()
    one = jax.jit(functools.partial(train.accumulate, **static))
    data = [_datum(8, rng) for _ in range(k * per_adapter)]
    [(_, host)] = batching.build_batches(data, "cross_entropy", config)
    one_hlo = one.lower(grads[0], loras[0], params, host.batch, {}).compile().as_text()

    elements = batch.tokens.size * intermediate
    assert host.batch.tokens.size == batch.tokens.size  # the same rows in both steps
    assert forward_layer_arrays(one_hlo, intermediate, elements) >= 1  # the parser sees SwiGLU
    assert forward_layer_arrays(many_hlo, intermediate, elements) == forward_layer_arrays(
        one_hlo, intermediate, elements
    )


# --------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_programs_have_no_host_callbacks(model_dir, ir_dump, tmp_path):
    service = tinker.ServiceClient(store_dir=str(tmp_path))
    training = service.create_lora_training_client(str(model_dir), rank=4, seed=0)
    sampler = training.save_weights_and_get_sampling_client("perf")
    before = ir_dump.files()
    params = tinker.SamplingParams(max_tokens=5, temperature=1.0, stop=[], seed=0)
    response = sampler.sample(tinker.ModelInput.from_ints([1, 2, 3, 4]), 2, params).result()
    assert [len(s.tokens) for s in response.sequences] == [5, 5]

    programs = ir_dump.read(ir_dump.files() - before)
    names = " ".join(programs)
    # Prefill and decode take the (unique) config, so this call lowers them; grow, first and start
    # depend only on shapes, which another test of this process may have lowered already: lowered here.
    for stage in ("jit__prefill", "jit__decode"):
        assert stage in names, f"{stage} was not lowered by this sample call: {sorted(programs)}"
    config, _ = load_pretrained(model_dir)
    ints, floats = jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.float32)
    rows = _Rows(
        prompt_len=ints,
        max_tokens=ints,
        temperature=floats,
        top_k=ints,
        top_p=floats,
        min_p=floats,
        presence=floats,
        frequency=floats,
        repetition=floats,
        context=jnp.zeros((2, 0), jnp.int32),
        bias_ids=jnp.zeros((2, 0), jnp.int32),
        bias=jnp.zeros((2, 0), jnp.float32),
        seed=jnp.zeros((2, 2), jnp.uint32),
        sample_index=ints,
        stop_ids=jnp.zeros((2, 4), jnp.int32),
    )
    logits = jnp.zeros((2, config.vocab_size))
    grow = jax.jit(_grow, static_argnames="size").lower(
        KVCache.zeros(config, 1, 16), logits[:1], ints, size=32
    )
    programs["grow"] = grow.as_text()
    programs["first"] = jax.jit(_first, static_argnames="topk").lower(logits, rows, topk=0).as_text()
    start = jax.jit(_start, static_argnames="size").lower(ints, floats, None, rows, size=32)
    programs["start"] = start.as_text()
    assert _flagged(programs) == {}


def _compiled_decode(model_dir, monkeypatch, max_tokens: int = 4) -> tuple[str, tuple[int, ...]]:
    """The compiled decode program of a 4-row sample, and its cache's ``(layers, B, S, nKV, D)``."""
    real, calls = sampling._program, []

    def spy(kind, *args, **kwargs):
        program = real(kind, *args, **kwargs)
        if kind != "decode":
            return program

        def call(*a):
            calls.append(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), a[1:]))
            return program(*a)

        return call

    monkeypatch.setattr(sampling, "_program", spy)
    config, params = load_pretrained(model_dir)
    request = SampleRequest(prompt=[1, 2, 3], num_samples=4, max_tokens=max_tokens, temperature=0.0)
    Sampler(config, params).sample([request])
    args = calls[-1]
    hlo = real("decode", None, None).lower(config, *args).compile().as_text()
    return hlo, args[2].cache.k.shape  # (params, lora, state, rows, end_step)


def test_decode_reads_the_kv_cache_in_place(model_dir, monkeypatch):
    """No decode step copies a layer's slice of the stacked KV cache out of it: with YNNPACK's reduce
    fusions XLA:CPU did, for every layer and step (see ``sampling.decode_compiler_options``)."""
    hlo, (_, b, s, kv, d) = _compiled_decode(model_dir, monkeypatch)
    layer = rf"f32\[(?:1,)?{b},{s},{kv},{d}\]"
    assert re.findall(rf"%[\w.-]*dynamic-slice[\w.-]* = {layer}[^\n]*", hlo) == []


def test_decode_scores_multiply_inside_their_reductions(tmp_path, monkeypatch):
    """The decode scores ``q . k`` over a head dim above 32 reduce straight from the cache: XLA:CPU
    would write every product out (``[B, S, nKV, G, D]``) for a reduce-window first. Only the
    probability-weighted values are still written out (kept on purpose, see ``cached_attention``)."""
    model = make_tiny(tmp_path / "qwen3", family="qwen3", size="tiny", head_dim=64, **UNIQUE_CONFIG)
    config = load_pretrained(model)[0]
    hlo, (_, b, s, kv, d) = _compiled_decode(model, monkeypatch, max_tokens=40)  # 64 slots: sums > 32
    g = config.num_heads // kv
    written = re.findall(rf"= f32\[{b},{s},{kv},{g},{d}\]\{{[^}}]*\}} fusion\(", hlo)
    assert len(written) == 1, written


def test_prefill_attends_within_the_prompt_only(model_dir):
    """A prefill fills a fresh cache, so it runs plain causal attention over the prompt: no second set
    of (fully masked) scores over the empty cache slots, which cost as much again."""
    config, params = load_pretrained(model_dir)
    p, t, kv = 2, 16, config.num_kv_heads
    g = config.num_heads // kv
    prefill = jax.jit(sampling._prefill, static_argnames=("config", "cache_dtype", "want_lp", "topk"))
    tokens, lengths = jnp.zeros((p, t), jnp.int32), jnp.full(p, t, jnp.int32)
    text = prefill.lower(config, jnp.float32, params, None, tokens, lengths, want_lp=False, topk=0).as_text()
    assert f"tensor<{p}x{t}x{kv}x{g}x{t}xf32>" not in text  # cached_attention's scores [P, T, kv, G, S]
    assert f"tensor<{p}x{kv}x{g * t}x{t}xf32>" in text  # the causal kernel's [P, kv, G * T, T]


@pytest.mark.parametrize("opt_out", [False, True])
def test_import_sets_up_the_allocator_unless_opted_out(opt_out):
    """glibc keeps freed memory from the first import on (before XLA starts its threads)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "JTINKER_TUNE_MALLOC": "0" if opt_out else "1"}
    code = "import jtinker; print(jtinker.hostmem.tuned)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(not opt_out)


def test_compiled_programs_are_dropped_near_the_memory_map_limit():
    """Past the given share of the kernel's memory-map limit every compiled program is dropped, and
    its kernels unmapped; below it nothing happens. The maps are listed at most once per interval."""
    from jtinker import hostmem

    program = jax.jit(lambda x: jnp.tanh(x) * 3 + 1)
    program(jnp.ones(3))
    maps = hostmem.memory_maps()
    assert hostmem.map_limit() > 0 and maps > 0
    assert not hostmem.release_programs_near_map_limit(fraction=1.0, interval=0)
    assert program._cache_size() == 1
    assert hostmem.release_programs_near_map_limit(fraction=0.0, interval=0)
    assert program._cache_size() == 0 and hostmem.memory_maps() < maps
    assert not hostmem.release_programs_near_map_limit(fraction=0.0, interval=3600)  # listed just now
    np.testing.assert_allclose(program(jnp.ones(3)), np.tanh(1.0) * 3 + 1, rtol=1e-6)  # compiles again


_SCHEDULED = """
import hashlib, os, sys
{before}
import jtinker, jax, jax.numpy as jnp

def layer(x, w):  # three independent products of one input: the schedulers order them differently
    return jnp.tanh(x @ w) + jnp.sin(x) @ w * (jnp.cos(x) @ w), None

program = jax.jit(lambda x, ws: jax.lax.scan(layer, x, ws)[0])
hlo = program.lower(jnp.ones((8, 64)), jnp.ones((4, 64, 64))).compile().as_text()
print(os.environ.get("XLA_FLAGS", ""), "|", hashlib.md5(hlo.encode()).hexdigest())
"""


def test_import_sets_xla_cpu_flags_that_reach_the_compiler():
    """``import jtinker`` adds its XLA:CPU flags (jtinker/xlaflags.py) while no backend has started, and
    XLA compiles with them; the user's own setting, an opt-out, or a backend already running leave
    ``XLA_FLAGS`` as it was."""
    import os
    import subprocess
    import sys

    from jtinker import xlaflags

    flag = xlaflags.FLAGS[0]
    name = flag.split("=")[0]

    def run(before: str = "", **env: str) -> tuple[str, str]:
        clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JTINKER_XLA_FLAGS")}
        clean["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        code = _SCHEDULED.format(before=before)
        out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True,
                             text=True, check=True)  # fmt: skip
        flags, hlo = out.stdout.strip().rsplit("|", 1)
        return flags.strip(), hlo.strip()

    added, hlo_with_flag = run()
    assert added == flag
    opted_out, hlo_default = run(JTINKER_XLA_FLAGS="0")
    assert opted_out == ""
    assert hlo_with_flag != hlo_default  # the flag changes how XLA schedules the program
    users = f"{name}=true"
    assert run(XLA_FLAGS=users)[0] == users
    assert run(XLA_FLAGS="--xla_force_host_platform_device_count=2")[0] == (
        f"--xla_force_host_platform_device_count=2 {flag}"
    )
    started, hlo_started = run("import jax; jax.numpy.ones(1).block_until_ready()")
    assert started == "" and hlo_started == hlo_default  # too late to change: left alone


def test_the_compile_cache_is_opt_in_on_cpu_bounded_and_locked(tmp_path):
    """On CPU the client configures no persistent cache unless ``JTINKER_COMPILE_CACHE=1`` (XLA:CPU's
    executable (de)serialization has crashed test workers). Once on, compiled programs go under
    ``$JTINKER_HOME/xla_cache`` with a size bound, which makes JAX hold a file lock around every
    read and write: a process never reads an entry another is still writing. A bad setting is
    refused by name."""
    import os
    import subprocess
    import sys

    from jtinker.client import COMPILE_CACHE_BYTES

    code = (
        "import jax, jtinker; jtinker.ServiceClient(); "
        "jax.jit(lambda x: x * 2)(jax.numpy.ones(3)).block_until_ready(); "
        "print(jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JTINKER_"))}
    env.update(JTINKER_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def run(setting: str | None) -> subprocess.CompletedProcess:
        extra = {} if setting is None else {"JTINKER_COMPILE_CACHE": setting}
        command = [sys.executable, "-c", code]
        return subprocess.run(command, env={**env, **extra}, capture_output=True, text=True)

    default = run(None)
    assert default.returncode == 0, default.stderr[-2000:]
    assert default.stdout.split() == ["None", "-1"] and not (tmp_path / "xla_cache").exists()
    on = run("1")
    assert on.returncode == 0, on.stderr[-2000:]
    cache = tmp_path / "xla_cache"
    assert on.stdout.split() == [str(cache), str(COMPILE_CACHE_BYTES)]
    assert (cache / ".lockfile").exists() and any(cache.glob("*-cache"))
    bad = run("yes")
    assert bad.returncode != 0 and "JTINKER_COMPILE_CACHE: must be 0 or 1, got 'yes'" in bad.stderr
