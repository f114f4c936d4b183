"""Install that never hurts: a plain wheel builds here without the CUDA extension and ships
fastnets/kernels/ plus the csrc/ sources; nothing in the repository is importable as another
package's top-level name (Hugging Face's `kernels`); csrc/ compiles with this machine's
CUDA toolkit and host compiler."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_extension(tmp_path):
    env = dict(os.environ, FASTNETS_BUILD_EXT="0")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    wheel = next(tmp_path.glob("fastnets-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ["fastnets/__init__.py", "fastnets/kernels/norm.py", "fastnets/kernels/activation.py",
                     "fastnets/csrc/bias_act.cu", "fastnets/csrc/fastnets.cpp", "fastnets/csrc/bias_act.h"]:
        assert expected in names, f"{expected} missing from the wheel"
    assert not any(n.startswith("kernels/") for n in names), "a top-level 'kernels' package must never ship"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    out = subprocess.run(["nvcc", "-c", "-O3", "-std=c++17", "-arch=sm_90", f"-I{ROOT / 'csrc'}",
                          str(ROOT / "csrc" / "bias_act.cu"), "-o", str(tmp_path / "bias_act.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_binding_compiles_against_torch_headers():
    from torch.utils.cpp_extension import include_paths
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]
    out = subprocess.run(["c++", "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=_C", *includes,
                          str(ROOT / "csrc" / "fastnets.cpp")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def _load_setup():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fastnets_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)   # defines the helpers; setup() runs only as __main__
    return module


def test_default_arch_list_without_a_visible_gpu(monkeypatch):
    setup_py = _load_setup()

    class FakeCuda:
        @staticmethod
        def is_available():
            return False

        @staticmethod
        def device_count():
            return 0

    class FakeTorch:
        cuda = FakeCuda

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    setup_py._default_arch_list(FakeTorch)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == setup_py.DEFAULT_ARCH_LIST == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    setup_py._default_arch_list(FakeTorch)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0a"   # the user's choice wins


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_install_with_cuda_torch_and_no_gpu_never_fails(tmp_path):
    """A CUDA build of torch, nvcc present, no GPU visible, and the extension build failing
    (here: torch's arch-flag step raising, as it does on an empty arch list): the wheel still
    builds, without fastnets._C, and says why in one line. The CPU torch here is made to look
    like a CUDA build by a sitecustomize in the build's environment."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch, torch.utils.cpp_extension as ce\n"
        "torch.version.cuda = '12.8'\n"
        "torch.cuda.is_available = lambda: False\n"
        "ce.CUDA_HOME = ce.CUDA_HOME or '/usr/local/cuda'\n"
        "def _no_arch(*a, **k):\n"
        "    raise RuntimeError('Error in _get_cuda_arch_flags: empty arch list')\n"
        "ce._get_cuda_arch_flags = _no_arch\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    env.pop("FASTNETS_BUILD_EXT", None)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "CUDA extension skipped (build failed: RuntimeError" in log, log[-4000:]
    wheel = next(tmp_path.glob("fastnets-*.whl"))
    assert not any(n.startswith("fastnets/_C") for n in zipfile.ZipFile(wheel).namelist())


# --- nothing in the repository shadows a top-level `kernels` (Hugging Face's, which
# transformers and diffusers import) from any working directory, the repository root included.

def test_no_top_level_folder_named_kernels():
    """A top-level kernels/ is importable as `kernels` whenever the root is on sys.path: as a
    regular package it shadows Hugging Face's, as a namespace portion it stands in for it when
    that is not installed. The kernels live in fastnets/kernels/."""
    assert not (ROOT / "kernels").exists()
    assert (ROOT / "fastnets" / "kernels" / "__init__.py").is_file()

def _import_top_level_kernels(cwd, first_path_entry, pythonpath=None, isolated=True):
    """`import kernels` in a fresh interpreter run in `cwd` with `first_path_entry` first on
    sys.path ('' is what `python -c` puts there, the absolute root what `python -m` does).
    isolated: -S, so no site-packages (no installed `kernels`, no fastnets) unless `pythonpath`
    brings one. Prints the module's file and search path, or fails with the import error."""
    code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); spec = importlib.util.find_spec('kernels'); "
            "print('spec', spec and (spec.origin, list(spec.submodule_search_locations or [])), file=sys.stderr); "
            "import kernels; print(kernels.__file__); print(list(getattr(kernels, '__path__', [])))")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    flags = ["-S"] if isolated else []
    return subprocess.run([sys.executable, *flags, "-c", code, first_path_entry], cwd=cwd, env=env,
                          capture_output=True, text=True)


def _fake_hub_kernels(tmp_path):
    """A stand-in for Hugging Face's `kernels`: a regular package with the names transformers
    imports from it and a subpackage (diffusers / torch reach `kernels._internals`)."""
    pkg = tmp_path / "site" / "kernels"
    (pkg / "_internals").mkdir(parents=True)
    (pkg / "__init__.py").write_text("class CUDAProperties: pass\n")
    (pkg / "_internals" / "__init__.py").write_text("")
    return pkg.parent, pkg / "__init__.py"


@pytest.mark.parametrize("first_entry", ["", str(ROOT)], ids=["python-c", "python-m"])
def test_top_level_kernels_from_the_root_is_the_installed_package(tmp_path, first_entry):
    site, init = _fake_hub_kernels(tmp_path)
    out = _import_top_level_kernels(ROOT, first_entry, pythonpath=site)
    assert out.returncode == 0, out.stderr[-3000:]
    file, path = out.stdout.splitlines()
    assert Path(file).resolve() == init.resolve(), f"`import kernels` from the repository root gave {file}"
    assert str(ROOT) not in path, path
    assert str(init) in out.stderr and str(ROOT) not in out.stderr, out.stderr   # find_spec finds it too
    out = subprocess.run([sys.executable, "-S", "-c", "import kernels._internals; from kernels import CUDAProperties"],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("first_entry", ["", str(ROOT)], ids=["python-c", "python-m"])
def test_top_level_kernels_from_the_root_without_one_installed_is_not_found(first_entry):
    out = _import_top_level_kernels(ROOT, first_entry)
    assert out.returncode != 0, f"`import kernels` from the repository root resolved to {out.stdout!r}"
    assert out.stderr.startswith("spec None\n"), out.stderr[-3000:]   # not even found
    assert "ModuleNotFoundError: No module named 'kernels'" in out.stderr, out.stderr[-3000:]


def test_top_level_kernels_and_fastnets_kernels_side_by_side(tmp_path):
    """In this test environment (Hugging Face's `kernels` installed or not): from the root,
    `import kernels` resolves exactly as it does from an unrelated folder, and
    fastnets.kernels still imports this repository's kernels in the same process."""
    elsewhere = _import_top_level_kernels(tmp_path, "", isolated=False)
    here = _import_top_level_kernels(ROOT, "", isolated=False)
    assert (here.returncode, here.stdout) == (elsewhere.returncode, elsewhere.stdout), (here.stdout, here.stderr[-2000:])
    assert here.stderr.splitlines()[0] == elsewhere.stderr.splitlines()[0], (here.stderr, elsewhere.stderr)   # find_spec
    out = subprocess.run([sys.executable, "-c", "import importlib.util, sys\n"
                          "try:\n    import kernels\nexcept ModuleNotFoundError:\n    pass\n"
                          "import fastnets.kernels.norm as norm\nprint(norm.__name__)\n"
                          "assert 'kernels.norm' not in sys.modules"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "fastnets.kernels.norm"


def test_transformers_and_diffusers_import_from_the_root():
    """The real clients: transformers (>= 5.25 imports Hugging Face's `kernels` as a hard
    dependency) and diffusers (through its PEFT loader), imported with the repository root first
    on sys.path, beside fastnets."""
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    code = ("import fastnets, transformers, transformers.modeling_utils, diffusers.loaders.peft\n"
            "from transformers import GPT2Config, GPT2Model\n"
            "GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8, bos_token_id=0, eos_token_id=0))\n"
            "import kernels, sys\n"
            "assert not str(getattr(kernels, '__file__', '')).startswith(sys.argv[1]), kernels.__file__\n")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "kernels")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
