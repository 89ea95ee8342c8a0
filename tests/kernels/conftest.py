"""Kernel tests run the Triton kernels in Triton's interpreter on CPU tensors.

Triton decides between compiling and interpreting as it decorates a kernel, so the variable is
set here, before any test imports ``kvscope.kernels._triton``. Without triton installed, the
interpreter tests skip (the reference and the pure functions are still tested).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
