"""Reading checkpoints without running code from them.

`torch.load(weights_only=True)` refuses any file whose pickle names a global outside torch's allow-list. Public taming
VQGAN `.ckpt` files are such files: Lightning 1 pickled its callbacks, `argparse.Namespace` / OmegaConf
hyper-parameters and the like beside the weights. Loading them with `weights_only=False` would run whatever callable
the file names (a `__reduce__` can name `os.system`). `load_checkpoint` instead unpickles them with `SafeUnpickler`:
tensors, storages and plain containers are rebuilt as usual, and every other global becomes an inert placeholder
class (`Inert`) that records its arguments and runs nothing. The weights load; the foreign objects are data.

`resolve_class_path` is the other half: a gr checkpoint names the LightningModule to rebuild (`_class_path`), and only
gr's own training modules are accepted, so a file cannot make `module_from_checkpoint` call an arbitrary callable.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import types
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

# Globals that rebuild tensors and plain values, by (module, name). The same kinds torch's weights_only loader trusts.
_TORCH_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy",
                     "_rebuild_meta_tensor_no_storage", "_rebuild_wrapper_subclass")
_BUILTINS = {"set": set, "frozenset": frozenset, "complex": complex, "slice": slice, "bytearray": bytearray,
             "range": range}
# The modules whose LightningModules a gr checkpoint may name in `_class_path`.
GR_MODULE_CLASSES = ("gr.training.pretrain.PretrainModule", "gr.training.finetune.FinetuneModule",
                     "gr.training.tokenizer.TokenizerModule")


class Inert:
    """Stands in for a global that a checkpoint names outside the allow-list. Calling, constructing or restoring it
    only records what the file passed (`args`, `kwargs`, `state`, `items`); no code of the named object runs."""

    target = "?"  # "module.name" that the file named; set on each generated subclass

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # a pickled dict subclass's SETITEMS
        self.items.append((key, value))

    def append(self, value: Any) -> None:  # a pickled list subclass's APPENDS
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.target}>"


def _safe_global(module: str, name: str) -> Optional[Any]:
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "builtins":
        return _BUILTINS.get(name)
    if module == "torch._utils" and name in _TORCH_REBUILDERS:
        return getattr(torch._utils, name, None)
    if module == "torch" and name in ("Size", "device"):
        return getattr(torch, name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return None


class SafeUnpickler(pickle.Unpickler):
    """A pickle.Unpickler whose globals are the allow-list above or `Inert` placeholders (listed in `replaced`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replaced: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _safe_global(module, name)
        if found is not None:
            return found
        target = f"{module}.{name}"
        if target not in self.replaced:
            self.replaced[target] = type(f"Inert[{target}]", (Inert,), {"target": target, "__module__": __name__})
        return self.replaced[target]


def _pickle_module(replaced: dict[str, type]) -> types.ModuleType:
    """A `pickle_module` for torch.load whose Unpickler (zip format) and load (legacy format) are both SafeUnpickler,
    collecting the placeholder names into `replaced`."""

    class _Unpickler(SafeUnpickler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.replaced = replaced

    def load(f: io.IOBase, **kwargs: Any) -> Any:
        return _Unpickler(f, **kwargs).load()

    mod = types.ModuleType("gr_safe_pickle")
    mod.Unpickler, mod.load, mod.UnpicklingError = _Unpickler, load, pickle.UnpicklingError
    return mod


def load_checkpoint(path: str, map_location: Any = "cpu") -> Any:
    """torch.load `path` without running code from it: weights_only first, SafeUnpickler for files that name other
    globals (logged with the names replaced by placeholders). Errors are torch's (missing file, corrupt zip)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass  # names a global outside torch's allow-list: rebuild it inertly below
    replaced: dict[str, type] = {}
    obj = torch.load(path, map_location=map_location, weights_only=False, pickle_module=_pickle_module(replaced))
    log.info("%s: %d pickled global(s) loaded as inert placeholders: %s", path, len(replaced),
             ", ".join(sorted(replaced)))
    return obj


def resolve_class_path(class_path: Any, path: str) -> type:
    """The LightningModule class a gr checkpoint names in `_class_path`, if it is one of gr's own modules or a subclass
    of one whose module is already imported (a user's subclass: import it first). Anything else is a ValueError in one
    line naming the file and the class path, raised before any import, since importing a module can run code."""
    import importlib
    import sys

    module_name, _, cls_name = str(class_path).rpartition(".")
    if class_path in GR_MODULE_CLASSES:
        cls = getattr(importlib.import_module(module_name), cls_name)
    else:
        cls = getattr(sys.modules.get(module_name), cls_name, None) if module_name else None
    bases = tuple(getattr(importlib.import_module(c.rpartition(".")[0]), c.rpartition(".")[2])
                  for c in GR_MODULE_CLASSES)
    if not (isinstance(cls, type) and issubclass(cls, bases)):
        raise ValueError(f"{path!r}: refusing _class_path {class_path!r}: not one of gr's LightningModules "
                         f"({', '.join(GR_MODULE_CLASSES)}) or an imported subclass of one")
    return cls
