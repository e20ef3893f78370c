"""Build: the simulator's hot modules compiled with Cython where a C compiler is at hand.

Everything else is in pyproject.toml. The modules stay plain Python (``.pxd`` files
beside some add C types when compiled); a build that fails leaves them as Python (the
same results, about half the speed). Each compiled module gets a ``.sha256`` file
beside it: the hash of the sources it was built from; ``staircase/compiled.py`` runs
the Python source instead of a build that no longer matches it.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent


def _compiled():
    """staircase/compiled.py, loaded from its file (the package is not importable yet):
    the list of modules to build and the source hash."""
    spec = importlib.util.spec_from_file_location("_compiled", ROOT / "staircase" / "compiled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildExt(build_ext):
    """Writes beside each module it built the hash of its sources (and removes the hash
    of one whose build failed, so an older build of it is not trusted)."""

    def run(self):
        self._built: set[str] = set()
        super().run()
        compiled = _compiled()
        for ext in self.extensions:
            source = ROOT.joinpath(*ext.name.split(".")).with_suffix(".py")
            for base in (ROOT, Path(self.build_lib)):  # in place (editable) and the wheel's copy
                stamp = base / (self.get_ext_filename(ext.name) + ".sha256")
                if ext.name not in self._built:
                    stamp.unlink(missing_ok=True)
                elif stamp.with_suffix("").exists():
                    stamp.write_text(compiled.source_hash(source))

    def build_extension(self, ext):
        super().build_extension(ext)  # an optional module's failure raises past this line
        self._built.add(ext.name)


def extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:  # a build without Cython: pure Python
        return []
    exts = [Extension(name, ["/".join(name.split(".")) + ".py"], optional=True) for name in _compiled().COMPILED]
    return cythonize(exts, build_dir="build/cython", quiet=True, nthreads=os.cpu_count() or 1,
                     compiler_directives={"language_level": 3, "annotation_typing": False})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt},
      options={"build_ext": {"parallel": os.cpu_count() or 1}})
