"""sparsemill: train TopK sparse autoencoders and transcoders on activations of frozen LLMs."""

import importlib
import os

__version__ = "0.1.0"

# OpenMP threads that spin while they wait take the cores that another process on the machine
# (a second rank, a data loader, another job) needs, and every short parallel region of a step
# then waits for a descheduled thread: on a 2-core Xeon the TopK step ran at 2.5-5.1x its
# matmul floor with a competing process, 2.0-2.4x with waiting threads asleep, and quiet runs
# kept their speed (the main job: 3,226 against 3,144 tokens/s). libgomp reads this when torch loads it,
# so it applies where sparsemill is imported first (its CLI and launch scripts); a value the
# user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
