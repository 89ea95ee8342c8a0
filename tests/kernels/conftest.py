"""Kernel tests run the Triton kernels in Triton's interpreter on CPU tensors.

Triton decides between compiling and interpreting as it decorates a kernel, so the variable is
set here, before any test imports ``kvscope.kernels._triton``. Without triton installed, the
interpreter tests skip (the reference and the pure functions are still tested). On a GPU machine,
``KVSCOPE_GPU_TESTS=1 pytest tests/kernels/test_kernels_gpu.py`` leaves the variable alone so the
kernels compile for the device.
"""

from __future__ import annotations

import os

if os.environ.get("KVSCOPE_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
