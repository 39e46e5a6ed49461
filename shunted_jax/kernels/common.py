"""What the Pallas (Triton) kernels share: where they run, their float32 accumulators, and the
GELU's pieces (Pallas' Triton lowering has no erf)."""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plt


def accumulator(dtype):
    """float32 sums for 16-bit inputs (as cuDNN); float64 inputs keep float64."""
    return jnp.promote_types(dtype, jnp.float32)


MIN_CUDA_CAPABILITY = (8, 0)
"""The kernels' Triton code needs an Ampere or newer GPU (bfloat16 tensor-core dots)."""


class Device(NamedTuple):
    """What the kernels would run on: the default backend's platform ("gpu", "cpu", "tpu"), its
    first device's name, and that device's CUDA compute capability (None elsewhere)."""
    platform: str
    kind: str = ""
    cuda_capability: tuple[int, int] | None = None

    @property
    def compiles_pallas(self) -> bool:
        """Whether the kernels compile here; elsewhere than on a GPU Pallas' interpreter runs them."""
        return self.cuda_capability is not None and self.cuda_capability >= MIN_CUDA_CAPABILITY

    def describe(self) -> str:
        capability = "no CUDA" if self.cuda_capability is None else "compute capability %d.%d" % self.cuda_capability
        return f"{self.kind or self.platform} ({capability})"


def _cuda_capability(device) -> tuple[int, int] | None:
    if "cuda" not in device.client.platform_version.lower():
        return None
    major, _, minor = str(getattr(device, "compute_capability", "")).partition(".")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def local_device() -> Device:
    """The Device of this process' default backend."""
    device = jax.devices()[0]
    platform = jax.default_backend()
    return Device(platform, device.device_kind, _cuda_capability(device) if platform == "gpu" else None)


class Target(NamedTuple):
    """How the kernels run: through Pallas' interpreter (off the GPU) or compiled, and whether the
    GELU may use PTX's approximate instructions (a CUDA GPU and float32 accumulators)."""
    interpret: bool
    fast_math: bool


def traced_once(*static_argnames: str):
    """`jax.jit` with these arguments static, for the functions that make a pallas_call.

    The model calls each kernel many times with the same shapes and settings (every block, the
    forward inside the backward); jitted, a kernel is traced and lowered once per distinct call
    rather than at every call, which shortens every (re)start of training.
    """
    return functools.partial(jax.jit, static_argnames=static_argnames)


def target_for(dtype, device: Device) -> Target:
    return Target(interpret=device.platform != "gpu",
                  fast_math=device.cuda_capability is not None and accumulator(dtype) == jnp.float32)


# Chebyshev fit of erfc(a) = t exp(-a^2 + P(t)), t = 1 / (1 + a / 2), a >= 0, with a relative
# error below 1.2e-7 (Numerical Recipes' erfcc).
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
                1.48851587, -0.82215223, 0.17087277)

_LOG2_E = 1.4426950408889634  # Python floats: weakly typed, so they keep float32 under x64
_INV_SQRT_2PI = 0.3989422804014327


def _approximate(instruction: str, x):
    """One PTX approximate float32 instruction (rcp.approx, ex2.approx: ~2 ulp) per element."""
    return plt.elementwise_inline_asm(f"{instruction}.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]


def multiply_add(a, b, c, fast_math: bool):
    """a * b + c. With `fast_math` (float32 on a CUDA GPU), one PTX fma.rn.f32 per element: XLA's
    Triton pipeline does not contract a product and a sum into an FMA (Nsight Compute counted 0
    fused of 396M float32 instructions in the depthwise forward kernel), so written apart they
    cost two instructions, the kernels' largest share, and two roundings instead of one."""
    if not fast_math:
        return a * b + c
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
    args = [jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in (a, b, c)]
    return plt.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=f,f,f,f", pack=1,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])[0]


def _exp(x, fast_math: bool):
    return _approximate("ex2", x * _LOG2_E) if fast_math else jnp.exp(x)


def normal_cdf(z, fast_math: bool):
    """Phi(z) through the erfc fit: relative error below 3e-5 in float32 (and 1.1e-7 in float64)
    everywhere, where a bfloat16 output rounds at 4e-3.

    With `fast_math` (float32 on a CUDA GPU) the fit's reciprocal and exponential are PTX's
    approximate instructions instead of IEEE division and libdevice's expf: the GELU is a large
    share of the depthwise forward kernel's instructions (BENCHMARKS.md).
    """
    a = jnp.abs(z) * (0.5 ** 0.5)
    denominator = multiply_add(a, 0.5, 1.0, fast_math)
    t = _approximate("rcp", denominator) if fast_math else 1.0 / denominator
    poly = _ERFC_COEFFS[-1]
    for c in _ERFC_COEFFS[-2::-1]:
        poly = multiply_add(poly, t, c, fast_math)
    tail = 0.5 * t * _exp(multiply_add(-a, a, poly, fast_math), fast_math)  # Phi(-|z|)
    return jnp.where(z >= 0, 1.0 - tail, tail)


def _normal_pdf(z, fast_math: bool):
    return _INV_SQRT_2PI * _exp(-0.5 * z * z, fast_math)


def gelu_slope(z, cdf, fast_math: bool):
    """d/dz of GELU(z) = z Phi(z), given Phi(z)."""
    return multiply_add(z, _normal_pdf(z, fast_math), cdf, fast_math)
