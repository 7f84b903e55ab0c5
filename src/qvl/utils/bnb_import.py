"""bitsandbytes imported for a setting that needs it (``quantization``, an 8-bit ``optim``): a missing or broken install
is one line naming the setting and the fix, not an ImportError from inside the run."""

from __future__ import annotations

from qvl.errors import QvlError

INSTALL_FIX = "pip install 'qvl[qlora]' (bitsandbytes >= 0.45; CPU and CUDA backends in one wheel)"


def import_bitsandbytes(setting: str, where: str, instead: str):
    """The bitsandbytes module, or a QvlError: ``setting`` (e.g. ``quantization=nf4``) needs it, at config key
    ``where``; ``instead`` is the setting that runs without it."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QvlError(f"{setting} needs bitsandbytes, which is not installed", where=where,
                       fix=f"{INSTALL_FIX}; or {instead}") from None
    except Exception as e:  # a broken install (e.g. its native library fails to load)
        raise QvlError(f"{setting}: bitsandbytes does not import ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]})", where=where, fix=INSTALL_FIX) from None
    return bnb
