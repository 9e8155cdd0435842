"""Matrix products in the forms XLA:CPU's fast kernels (YNNPACK, native bf16) take.

XLA:CPU runs a product on its fast kernels only as ``[m, k] x [k, n]`` with row-major operands, and
multiplies bf16 natively only into an f32 result; anything else runs on slower kernels, or widens
bf16 to f32 first. Other backends take every form at full speed: there these are the plain products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def materialized_t(m: jax.Array) -> jax.Array:
    """``m`` with its last two axes swapped as an actual array, for the operand of a product that
    sums over that operand's rows (a weight gradient: ``m.T @ g``).

    XLA folds a plain transpose into the dot (one contracting dimension 0 of both operands), a form
    XLA:CPU's YNNPACK dots do not take: it then runs Eigen on a transposed copy of the other, often
    much larger, operand (the ``[rows, out]`` cotangent). Transposing ``m`` (small: ``x @ a`` is
    ``[rows, r]``) explicitly, behind a barrier that keeps XLA from folding it back, gives the dot its
    canonical ``[m, k] x [k, n]`` form. Other backends transpose operands for free: plain ``m.T``.

    A bf16 transpose passes the barrier with a trailing unit axis: a transpose's own result enters
    XLA laid out as its operand was (column-major), and XLA:CPU picks the products its native bf16
    kernels take before it assigns layouts, so such an operand sent a bf16 product back to f32.
    """
    if native_low_precision(m):
        return kept_as_is(jnp.swapaxes(m, -1, -2)[..., None])[..., 0]
    return kept_as_is(jnp.swapaxes(m, -1, -2))


def kept_as_is(x):
    """``x`` behind a barrier on CPU, so XLA cannot fold a neighbouring transpose into a product."""
    return jax.lax.optimization_barrier(x) if jax.default_backend() == "cpu" else x


def native_low_precision(x: jax.Array) -> bool:
    """Whether products of ``x`` need the form of XLA:CPU's native bf16 kernels (see :func:`mm`)."""
    return x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in ``a``'s dtype. On CPU, bf16 operands multiply into an f32 result that is rounded
    once: XLA:CPU then runs its native bf16 kernels (AVX512-BF16, about 1.8x its f32 rate), where a
    bf16 result makes it widen both operands and multiply in f32."""
    if not native_low_precision(a):
        return a @ b
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def mm_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` (:func:`mm`). XLA:CPU's native bf16 kernels take only ``[m, k] x [k, n]``: a
    transpose folded into the product would send it back to f32, so on CPU ``b.T`` is formed."""
    return mm(a, materialized_t(b) if native_low_precision(a) else b.T)
