"""Make the CUDA-only torchvision 0.28.0 wheel importable next to CPU torch 2.13.0.

Why: on a CPU machine the only torchvision release that accepts torch 2.13.0 is a CUDA build. Its C++ extension
fails to load, and then its Python side registers fake kernels for `torchvision::nms` / `torchvision::qnms`, which
raises "operator torchvision::nms does not exist" and breaks `import lightning` (via torchmetrics) and
`import open_clip`. We only need torchvision's pure-Python parts (transforms), so when -- and only when -- the
extension cannot be loaded we declare the two op schemas before torchvision is first imported.

The Makefile's CPU install path copies this file into the venv's site-packages and adds a `.pth` line that calls
`install()`. The hook is lazy: torch is only imported when something imports torchvision. GPU installs never use it.
"""

import importlib.abc
import importlib.util
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBS = []  # keep torch.library.Library objects alive


def _declare_missing_ops():
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import glob
    import os

    for location in spec.submodule_search_locations:
        for lib_path in glob.glob(os.path.join(location, "_C*.so")):
            try:
                torch.ops.load_library(lib_path)
                return  # the real extension works: nothing to do
            except (OSError, RuntimeError):
                pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        try:
            lib.define(schema)
        except RuntimeError:
            pass  # already defined
    _LIBS.append(lib)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            _declare_missing_ops()
        except Exception as exc:  # never break interpreter start-up over the shim
            print(f"[gr torchvision shim] could not declare ops: {exc}", file=sys.stderr)
        return None  # let the normal finders import torchvision


def install():
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
