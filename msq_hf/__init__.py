"""msq_hf: MSQ (memory-efficient bit sparsification quantization) for Hugging Face models.

``import msq_hf`` is cheap: it imports neither torch, transformers, timm, datasets nor matplotlib. The public
names (:data:`__all__`) are loaded on first use (PEP 562 ``__getattr__``), so ``msq-hf --help`` answers at once
and ``msq_hf.__version__`` costs nothing. ``from msq_hf import MSQConfig`` works as always.

Importing this package still registers msq_hf with the libraries it extends, at the moment they load (before
if they are loaded already), through a ``sys.meta_path`` finder that runs a callback after these imports:

* ``transformers.quantizers.auto`` (transformers' quantizer registry): ``quant_method="msq"`` maps to
  ``MSQConfig`` and to a stand-in quantizer class whose first instantiation imports the real ``MSQQuantizer``.
  That registry is imported halfway through ``transformers.modeling_utils``, when ``PreTrainedModel`` does not
  exist yet, so the real quantizer (a module that needs ``PreTrainedModel``) cannot be imported right there;
  the stand-in defers it to ``from_pretrained`` time. ``AutoModel*.from_pretrained`` therefore rebuilds MSQ
  checkpoints and exports after ``import msq_hf``, in either import order;
* ``timm``: the CIFAR ResNets (``resnet20/32/56_cifar``) join timm's model registry (:mod:`msq_hf.models`);
* msq_hf's own modules: once ``msq_hf.integrations.transformers`` is loaded and no msq_hf module is still
  executing on this thread, the real quantizer replaces the stand-in and :mod:`msq_hf.io.save` binds the
  ``save_pretrained``/``push_to_hub`` of MSQ models (what ``import msq_hf`` used to do eagerly).

This file imports msq_hf modules by name (``importlib.import_module`` over the tables below, through
:mod:`msq_hf.lazy`) instead of with import statements: that is what makes the package lazy.
``msq_hf/pipeline/__init__.py`` does the same for the pipeline, and ``msq_hf.commands.main`` for its command
table. Everywhere else the architecture rule holds (docs/architecture.md: no function-level import of msq_hf's
own modules).
"""

from __future__ import annotations

import importlib
import sys
import threading
import warnings
from types import ModuleType
from typing import Any

from msq_hf.lazy import lazy_exports

__version__ = "0.1.0"

# module -> the public names it defines; ``msq_hf.<name>`` imports the module on first use
_PUBLIC: dict[str, tuple[str, ...]] = {
    "msq_hf.config": ("MSQConfig",),
    "msq_hf.convert": ("bit_scheme", "compression_ratio", "layer_numels", "set_bit_scheme"),
    "msq_hf.errors": (
        "MSQError",
        "MSQExportError",
        "MSQFormatError",
        "MSQIntegrityError",
        "MSQMissingFileError",
        "MSQTrainingError",
    ),
    "msq_hf.integrations.transformers": ("MSQQuantizer",),
    "msq_hf.io.export": ("ExportResult", "export"),
    "msq_hf.io.inspect": ("InspectReport", "format_report", "inspect_export"),
    "msq_hf.io.load": ("from_pretrained",),
    "msq_hf.nn.layers": ("MSQConv2d", "MSQLinear"),
    "msq_hf.nn.packed": ("MSQPackedConv2d", "MSQPackedLinear"),
    "msq_hf.quantize": ("dequantize_model", "quantize_model"),
    "msq_hf.training.controller": ("MSQController",),
    "msq_hf.training.schedule": ("BitPruningSchedule", "PruneDecision"),
    "msq_hf.training.sensitivity": ("estimate_sensitivities", "hutchinson_trace"),
    "msq_hf.training.trainer": ("MSQCallback", "MSQTrainer", "load_timm_checkpoint"),
}
__all__ = sorted([*(name for names in _PUBLIC.values() for name in names), "__version__"])
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, globals())


# ---------------------------------------------------------------------------------------------------------------
# registration with transformers and timm, when (or if) they are imported

_TRANSFORMERS_REGISTRY = "transformers.quantizers.auto"
_TIMM = "timm"
_INTEGRATION = "msq_hf.integrations.transformers"
_SAVE_HOOKS = "msq_hf.io.save"
_STAND_IN_FLAG = "msq_hf_stand_in"  # marks the stand-in quantizer; integrations.transformers.register() replaces it

_state = threading.local()  # .depth: msq_hf modules executing on this thread (nested imports)
_activated = False  # the real quantizer is registered and the save hooks are bound


def _stand_in_quantizer(base: type) -> type:
    """A ``base`` (``HfQuantizer``) subclass whose instantiation returns the real ``MSQQuantizer``."""

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        real = importlib.import_module(_INTEGRATION).MSQQuantizer  # also runs _activate(): real one registered
        return real(*args, **kwargs)

    doc = "Stands in for msq_hf.MSQQuantizer until transformers first instantiates it (see msq_hf/__init__.py)."
    namespace = {"__new__": __new__, "__doc__": doc, "__module__": __name__, _STAND_IN_FLAG: True}
    return type("MSQQuantizer", (base,), namespace)


def _register_with_transformers(auto: ModuleType) -> None:
    """Map ``quant_method="msq"`` in transformers' registries (idempotent; a real entry is kept)."""
    config = importlib.import_module("msq_hf.config")
    method = config.QUANT_METHOD
    if method not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(method)(config.MSQConfig)
    if method not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(method)(_stand_in_quantizer(auto.HfQuantizer))


def _register_with_timm(timm: ModuleType) -> None:
    importlib.import_module("msq_hf.models")  # @register_model on import


def _activate() -> None:
    """The real ``MSQQuantizer`` in transformers' registry and the save hooks bound (once the integration is
    loaded; called when no msq_hf module is executing, so these imports cannot meet a half-initialised one)."""
    global _activated
    if _activated or _INTEGRATION not in sys.modules:
        return
    _activated = True
    try:
        sys.modules[_INTEGRATION].register()
        importlib.import_module(_SAVE_HOOKS)
    except BaseException:
        _activated = False
        raise


_AFTER_IMPORT = {_TRANSFORMERS_REGISTRY: _register_with_transformers, _TIMM: _register_with_timm}


def _run_hook(name: str, module: ModuleType) -> None:
    """Register with ``module``; a failure is a warning, never a broken ``import transformers``/``import timm``."""
    try:
        _AFTER_IMPORT[name](module)
    except Exception as exc:
        warnings.warn(f"msq_hf: could not register with {name} ({type(exc).__name__}: {exc})", stacklevel=2)


class _HookedLoader:
    """Wraps a module's loader (``importlib.abc.Loader`` protocol, not subclassed: ``importlib.abc`` costs
    ~20 ms of imports): runs the module, then the callbacks that wait for it."""

    def __init__(self, loader: Any, name: str) -> None:
        self.loader = loader
        self.name = name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        own = self.name.startswith("msq_hf.")
        depth = getattr(_state, "depth", 0)
        _state.depth = depth + own
        try:
            self.loader.exec_module(module)
        finally:
            _state.depth = depth
        if self.name in _AFTER_IMPORT:
            _run_hook(self.name, module)
        if own and depth == 0:
            _activate()

    def __getattr__(self, attr: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self.loader, attr)


class _PostImportFinder:
    """Finds nothing itself: asks the other finders and wraps the loader of the modules watched here."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _AFTER_IMPORT and not fullname.startswith("msq_hf."):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None


def _install() -> None:
    if not any(type(f).__name__ == _PostImportFinder.__name__ for f in sys.meta_path):  # once, also on reload
        sys.meta_path.insert(0, _PostImportFinder())
    for name in _AFTER_IMPORT:  # already imported: register now
        module = sys.modules.get(name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False) is False:
            _run_hook(name, module)
    _activate()


_install()
