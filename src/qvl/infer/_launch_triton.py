"""Programmatic dependent launch inside qvl's Triton kernels (Hopper and later): a kernel lets the next one start
while it runs, and waits for the one before it only where it first reads what that one wrote. Imported, and so
jitted, only where a kernel module is (Triton's interpreter, if asked for by then, runs them; it never overlaps:
qvl.infer.triton_support.overlap)."""

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton before 3.4: never called (triton_support.overlap keeps PDL off)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def let_next_start(PDL: tl.constexpr):
    """The next kernel on the stream may start now (its programs wait in :func:`wait_for_previous`); it starts
    once every program of this one has passed here or ended."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Until the kernel before this one has ended and its writes are seen. Every overlapped kernel passes here
    before it ends, so the kernel before it had waited for its own predecessor: all earlier writes are seen."""
    if PDL:
        gdc_wait()
