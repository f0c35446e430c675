"""`python -m kernels.benchmarks.gpu_check --dry-run`: the device check's whole code path on CPU
under the Triton interpreter, without deepspeed or transformers importable; and its parity
section fails loudly when a kernel is wrong."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# make deepspeed / transformers unimportable: the check must need only torch + triton + this repo
BLOCK = "import sys; sys.modules.update(deepspeed=None, transformers=None, accelerate=None); "


def _run(code: str, timeout: int = 600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_passes_and_reports_every_section():
    out = _run("import runpy; sys.argv = ['gpu_check', '--dry-run']; "
               "runpy.run_module('kernels.benchmarks.gpu_check', run_name='__main__')")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    for needle in ("== parity", "encode selection", "large k=40", "widening k=n", "deterministic scatter",
                   "decode grad values (gather-dot)", "encode_at grad W_enc", "encode throughput",
                   "SAETrainer.step", "tokens/s", "PARITY OK"):
        assert needle in text, needle
    n_ok, n_all = text.split("parity: ")[1].split(" checks ok")[0].split(" / ")
    assert n_ok == n_all and int(n_all) >= 40


def test_parity_fails_on_a_wrong_kernel():
    """A gather-dot off by 1 % (the decoder values' gradient) must be reported as a failure and
    make main() exit non-zero."""
    code = textwrap.dedent("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        from kernels import triton_ops as T
        from kernels.benchmarks import gpu_check
        good = T.gather_dot
        T.gather_dot = lambda *a, **kw: good(*a, **kw) * 1.01
        gpu_check.DRY_SHAPES = gpu_check.DRY_SHAPES[:1]
        gpu_check.encode_throughput = lambda *a: ({}, 1.0)  # speed sections: not under test here
        gpu_check.train_step = lambda *a, **kw: (1.0, 0.0, 1.0, 0)
        rc = gpu_check.main(["--dry-run"])
        print("RC", rc)
    """)
    out = _run(code)
    text = out.stdout + out.stderr
    assert "RC 1" in text, text[-4000:]
    assert "FAIL" in text and "PARITY FAILED" in text and "gather-dot" in text.split("PARITY FAILED")[1]
