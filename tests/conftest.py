"""Test-suite set-up: 8 fake CPU devices for the sharding tests, float32 matmuls at full precision."""

import atexit
import os
import shutil
import tempfile

# One persistent XLA compilation cache for the test session, made by the first process that
# loads this file (pytest, or its controller under xdist) before jax is imported: the xdist
# workers and every subprocess a test starts (``python -m train.pretrain``, benchmarks, notebook
# kernels) inherit it through the environment. A run that compiles the same program as an
# earlier one (a resume, a rerun after a signal, a reference run) loads the executable instead
# of compiling it again; what runs is the same. A size limit turns on jax's file lock, so
# concurrent processes never read a half-written entry. A cache set by the user is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _xla_cache = tempfile.mkdtemp(prefix="ngalore-jax-tests-xla-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LAPACK (the CPU SVD) under OpenBLAS threads spin-waits on a busy 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
