"""sparsemill: train TopK sparse autoencoders and transcoders on activations of frozen LLMs."""

import importlib

__version__ = "0.1.0"


def _check_kernels_package() -> None:
    """`kernels` is also the import name of a Hugging Face package; make a shadowing
    install fail loudly here instead of with a confusing AttributeError later."""
    mod = importlib.import_module("kernels")
    if not getattr(mod, "SPARSEMILL_KERNELS", False):
        raise ImportError(
            f"the 'kernels' package imported from {getattr(mod, '__file__', '?')} is not sparsemill's: another "
            "distribution (likely Hugging Face's `kernels`) shadows it. Uninstall it (pip uninstall kernels) "
            "or reinstall sparsemill (pip install -e .) so that sparsemill's kernels/ comes first on sys.path."
        )


_check_kernels_package()
