"""``MSQQuantizer``: the transformers ``HfQuantizer`` registered under ``quant_method="msq"``.

It makes ``from_pretrained`` rebuild MSQ models and ``save_pretrained`` write the bit scheme:

* before weights load (on the meta device) it swaps Linear/Conv2d for MSQ layers with the
  precisions of ``quantization_config.bit_scheme`` (or ``init_bits`` for a fresh float checkpoint),
  or for packed layers when the checkpoint is an msq_hf export;
* after loading it re-initialises every buffer the checkpoint did not provide (transformers fills
  missing buffers with ``torch.empty_like`` garbage) and validates the loaded bit widths;
* on save it hands transformers the state dict to write and a *copy* of the config carrying the current
  bit scheme for ``config.json`` (the user's ``MSQConfig`` is never modified).

Every ``config.json`` msq_hf writes (exports and training checkpoints) holds ``transformers_weights`` =
:data:`LOAD_GUARD`, a sentence that is not a file name: transformers *without* msq_hf refuses it before it
opens any weight file and prints the sentence ("... it is neither a safetensors file ...: <LOAD_GUARD>"), so
MSQ weights never load silently as a float model. With msq_hf the quantizer replaces it (see
:meth:`MSQQuantizer.update_attn_implementation`).

:func:`attach_quantizer` gives a converted model what transformers looks for (``hf_quantizer``, a private copy
of its ``config`` carrying ``quantization_config``) and, for ``PreTrainedModel``, the ``save_pretrained`` /
``push_to_hub`` registered by :mod:`msq_hf.io.save` (:func:`register_save_hooks`): they write the packed export.
:func:`register` puts ``MSQConfig``/``MSQQuantizer`` into transformers' AUTO mappings; ``import msq_hf`` calls it.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, TimmWrapperPreTrainedModel
from transformers.quantizers import auto
from transformers.quantizers.base import HfQuantizer

from msq_hf.config import QUANT_METHOD, MSQConfig
from msq_hf.convert import (
    bit_scheme,
    dequantize_model,
    finalize_packed_model,
    find_convertible_layers,
    iter_msq_layers,
    prepare_packed_model,
    swap_layers,
)
from msq_hf.errors import MSQFormatError
from msq_hf.integrations.guard import watch_training
from msq_hf.io.format import (
    CONFIG_WEIGHTS_KEY,
    export_weights_entry,
    packed_metadata,
    packed_state_dict,
    read_safetensors_header,
)
from msq_hf.nn.packed import MSQPackedMixin
from msq_hf.quant.functional import MAX_BITS, MIN_BITS

GUARD_KEY = "transformers_weights"  # the config.json key transformers reads the weight file name from
LOAD_GUARD = (
    "this folder holds MSQ weights (msq_hf). Install msq-hf (pip install msq-hf) and `import msq_hf` before "
    "from_pretrained, or load it with msq_hf.from_pretrained(path_or_repo_id)"
)
_save_hooks: dict[str, Callable[..., Any]] = {}  # method name -> function(model, ...), see register_save_hooks


class MSQQuantizer(HfQuantizer):
    """HF quantizer for MSQ checkpoints: fake-quant training checkpoints and bit-packed exports."""

    requires_calibration = False

    def __init__(self, quantization_config: MSQConfig, **kwargs: Any):
        if isinstance(quantization_config, dict):
            quantization_config = MSQConfig.from_dict(quantization_config)
        super().__init__(quantization_config, **kwargs)
        self._expected_bits: dict[str, int] = {}
        self._from_files = False  # transformers reads checkpoint files (not a state_dict): see own_tensors
        self._export: tuple[dict[str, torch.Tensor], MSQConfig] | None = None  # see exporting()

    @property
    def packed(self) -> bool:
        """True when loading an msq_hf export (bit-packed weights)."""
        return self.pre_quantized and self.quantization_config.msq_format == "packed"

    # -- capabilities ---------------------------------------------------------------------------
    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to check: MSQ runs wherever torch runs."""

    def update_attn_implementation(self, config: Any) -> Any:
        """Name the weight file for ``AutoModel*.from_pretrained`` of an export or checkpoint (after ``import msq_hf``).

        transformers 5 reads the checkpoint file name from ``config.transformers_weights`` and gives a
        quantizer exactly one look at the model config before it resolves files: this call
        (``get_hf_quantizer``, quantizers/auto.py). ``config.json`` stores :data:`LOAD_GUARD` there, which stops
        transformers without msq_hf; the real name of an export's weight file lives under ``msq_weights``. Here
        an export gets that name, a training checkpoint the default (``model.safetensors``). A name set
        explicitly is kept, except for an export: its weight file name always comes from its verified manifest,
        never from ``config.json`` (:func:`msq_hf.io.format.export_weights_entry`). The attention
        implementation is left as it is.
        """
        config = super().update_attn_implementation(config)
        fit_timm_config(config)
        if self.packed:
            name = export_weights_entry(
                getattr(config, "name_or_path", None), getattr(config, CONFIG_WEIGHTS_KEY, None)
            )
            setattr(config, GUARD_KEY, name)
            return config
        current = getattr(config, GUARD_KEY, None)
        if current is not None and current != LOAD_GUARD:
            return config
        if current is not None:
            delattr(config, GUARD_KEY)
        return config

    # -- loading --------------------------------------------------------------------------------
    def _check_holds_msq_tensors(self, checkpoint_files: list[str] | None, expected: int) -> None:
        """Refuse float weights that came with an msq ``quantization_config`` (no ``bits`` tensor stored).

        A float model saved with a stale ``quantization_config`` in its config would otherwise get
        ``bits``/``k`` from uninitialised memory (transformers fills missing buffers with ``torch.empty``).
        """
        if not checkpoint_files:
            return
        stored = set()
        for path in checkpoint_files:
            if str(path).endswith(".safetensors"):
                stored |= {k for k in read_safetensors_header(Path(path)) if k.endswith(".bits") or k == "bits"}
        if len(stored) < expected:
            raise MSQFormatError(
                f"{checkpoint_files[0]}: config.json has an msq quantization_config (msq_format 'fake', "
                f"{expected} quantized layers) but the weights hold {len(stored)} MSQ bit widths ('<layer>.bits'): "
                "these are float weights saved with a quantization_config that does not belong to them; delete "
                "quantization_config from config.json to load them as a float model"
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg: MSQConfig = self.quantization_config
        if self.packed:
            prepare_packed_model(packed_root(model, cfg), cfg, dequantize=cfg.dequantize)
            self._from_files = bool(kwargs.get("checkpoint_files"))
            return model
        names = find_convertible_layers(model, cfg.modules_to_not_convert)
        scheme = cfg.bit_scheme or {}
        unknown = sorted(set(scheme) - set(names))
        if unknown:
            raise ValueError(
                f"quantization_config.bit_scheme names layer(s) {unknown[:5]} that this "
                f"{type(model).__name__} does not have (or that are excluded); the checkpoint "
                "was saved from a different architecture or transformers version"
            )
        if self.pre_quantized:
            self._check_holds_msq_tensors(kwargs.get("checkpoint_files"), len(names))
        swap_layers(model, cfg, names, scheme)
        self._expected_bits = {n: scheme.get(n, cfg.init_bits) for n in names}
        model.msq_config = cfg
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg: MSQConfig = self.quantization_config
        if self.packed:
            for attr in (GUARD_KEY, CONFIG_WEIGHTS_KEY):
                # load-time redirection only: a later save_pretrained writes its own file names
                with contextlib.suppress(AttributeError):
                    delattr(model.config, attr)
            if self._from_files:  # AutoModel*.from_pretrained(export): tensors on transformers' file mapping
                own_tensors(model)  # first, so that the packed layers validate the bytes they keep
            model = finalize_packed_model(model, cfg)
            install_save_hooks(model)
            watch_training(model)  # inference-only: a training forward says so (msq_hf.integrations.guard)
            return model
        for name, layer in iter_msq_layers(model):
            expected = self._expected_bits.get(name, cfg.init_bits)
            if not self.pre_quantized:
                # float checkpoint: bits/k were never stored, their memory is uninitialised
                layer.bits.fill_(expected)
                layer.k.fill_(0)
                if layer.weight_step is not None:  # qat_scale="learned": inactive until the final round
                    layer.weight_step.data.zero_()
            else:
                bits = int(layer.bits)
                if not MIN_BITS <= bits <= MAX_BITS or (cfg.bit_scheme and bits != expected):
                    raise ValueError(
                        f"layer {name!r}: checkpoint holds bits={bits}, but quantization_config."
                        f"bit_scheme says {expected} (allowed {MIN_BITS}..{MAX_BITS}); the "
                        "checkpoint is corrupt or was edited"
                    )
                if not 0 <= int(layer.k) < bits:
                    layer.k.fill_(0)
                layer.sync_learned_step()  # transformers assigns tensors without load_state_dict's post-hooks
            sub = getattr(layer, "act_quant", None)
            if sub is not None and hasattr(sub, "signed") and int(sub.signed) not in (-1, 0, 1):
                sub.signed.fill_(-1)
        model.msq_config = cfg
        with contextlib.suppress(AttributeError):
            delattr(model.config, GUARD_KEY)
        install_save_hooks(model)
        watch_training(model)  # warns if trained without MSQTrainer / MSQCallback / MSQController
        return model

    # -- saving ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def exporting(self, state: dict[str, torch.Tensor], config: MSQConfig) -> Iterator[None]:
        """Inside this block ``save_pretrained`` writes ``state`` (a packed state dict) and ``config`` (what
        ``msq_hf.export`` does) instead of the model's own tensors and bit scheme."""
        self._export = (state, config)
        try:
            yield
        finally:
            self._export = None

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
        """The state dict to save and the ``quantization_config`` that goes to ``config.json``.

        A plain ``save_pretrained`` writes a training checkpoint (``msq_format="fake"``: float latent
        weights + ``bits``/``k``, resumable). Inside :meth:`exporting`, or for a model loaded from an
        export (whose layers hold only packed codes), it writes the bit-packed state dict instead.
        transformers serialises ``model.config.quantization_config`` right after this call, so that
        attribute gets a copy describing this checkpoint; ``self.quantization_config`` (the user's
        ``MSQConfig``, also ``model.msq_config``) stays as it is.
        """
        if self._export is not None:
            state, saved = self._export
            metadata = packed_metadata()
        elif any(isinstance(m, MSQPackedMixin) for m in model.modules()):
            state, layers = packed_state_dict(model)
            scheme = {n: i["bits"] for n, i in layers.items()}
            saved = self.quantization_config.copy(bit_scheme=scheme, msq_format="packed", dequantize=False)
            metadata = packed_metadata()
        else:
            state, metadata = None, {"msq_format": "fake"}
            saved = self.quantization_config.copy(bit_scheme=bit_scheme(model), msq_format="fake")
        model.config.quantization_config = saved
        return state, metadata

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_model(model)


def fit_timm_config(config: Any) -> None:
    """Let ``TimmWrapperForImageClassification`` build the model of a raw timm ``config.json``.

    transformers reads a folder whose ``config.json`` has timm's ``architecture`` as a TimmWrapper config.
    timm (>= 1.0.2x) also records ``num_classes`` inside ``model_args``; TimmWrapper passes
    ``num_classes=num_labels`` *and* ``**model_args`` to ``timm.create_model`` and fails with "got multiple values
    for keyword argument 'num_classes'". The copy in ``model_args`` is dropped (``num_labels``, read from the
    root ``num_classes``, wins, as in ``TimmWrapperConfig.from_dict``); the file on disk is not touched.
    """
    args = getattr(config, "model_args", None)
    if getattr(config, "model_type", None) == "timm_wrapper" and isinstance(args, dict) and "num_classes" in args:
        config.model_args = {k: v for k, v in args.items() if k != "num_classes"}


def own_tensors(model: nn.Module) -> None:
    """Give every parameter and buffer of ``model`` memory of its own (a clone; one shared by several modules stays
    shared).

    transformers loads safetensors files through a memory mapping and the loaded tensors are windows on it: the
    file's pages would stay behind the model, and an in-place rewrite of the file would change the model.
    ``msq_hf.from_pretrained`` does not need this: it hands transformers tensors read into memory of their own.
    """
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, kept so its id stays unique; copy)
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "cpu":
                    continue
                if id(tensor) not in copies:
                    new = tensor.detach().clone()
                    if isinstance(tensor, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                    copies[id(tensor)] = (tensor, new)
                table[name] = copies[id(tensor)][1]


def packed_root(model: nn.Module, cfg: MSQConfig) -> nn.Module:
    """The module the layer names of ``cfg.bit_scheme`` are relative to.

    The model itself, except for a raw timm export loaded through transformers: its names (``conv1``) are those
    of the timm model, which ``TimmWrapperPreTrainedModel`` holds as ``timm_model`` (an export *of* a TimmWrapper
    model names ``timm_model.conv1``). transformers itself adds the ``timm_model.`` prefix to the checkpoint
    keys (its ``timm_wrapper`` weight conversion), so only the layer swap needs the inner module.
    """
    prefix = model.base_model_prefix if isinstance(model, TimmWrapperPreTrainedModel) else ""
    inner = getattr(model, prefix, None) if prefix else None
    scheme = cfg.bit_scheme or {}
    if isinstance(inner, nn.Module) and scheme and not any(n.startswith(f"{prefix}.") for n in scheme):
        return inner
    return model


def own_config(model: nn.Module) -> None:
    """Give ``model`` a private copy of its HF ``config`` (and of every sub-config its modules hold).

    A ``PreTrainedModel`` keeps the config object it was built with, by reference, in itself and in many
    submodules; the caller may build more models from the same object. Writing ``quantization_config`` into
    it would make a *float* model built later from it save as MSQ. The copy is swapped in everywhere the
    original was referenced, so ``set_attn_implementation`` and friends still reach every module.
    """
    old = getattr(model, "config", None)
    if not isinstance(old, PretrainedConfig):
        return
    memo: dict[int, Any] = {}
    copy.deepcopy(old, memo)
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            if isinstance(value, PretrainedConfig) and id(value) in memo:
                module.__dict__[attr] = memo[id(value)]


def register_save_hooks(**hooks: Callable[..., Any]) -> None:
    """Set the functions that replace ``save_pretrained``/``push_to_hub`` of MSQ transformers models.

    :mod:`msq_hf.io.save` registers them at import (it sits above this module: it writes exports).
    """
    _save_hooks.update(hooks)


def install_save_hooks(model: nn.Module) -> None:
    """Bind the registered hooks on ``model`` (an instance attribute shadows the class method)."""
    if isinstance(model, PreTrainedModel):
        for name, fn in _save_hooks.items():
            model.__dict__[name] = types.MethodType(fn, model)


def attach_quantizer(model: nn.Module, config: MSQConfig, pre_quantized: bool = False) -> None:
    """Attach what Trainer and ``save_pretrained`` look for on a quantized model (the inverse of
    :func:`msq_hf.convert.forget_quantization`). The model's HF config is copied first (:func:`own_config`),
    so the caller's config object is never written to."""
    model.hf_quantizer = MSQQuantizer(config, pre_quantized=pre_quantized)
    model.is_quantized = True
    model.quantization_method = "msq"
    model.msq_config = config
    own_config(model)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        hf_config.quantization_config = config
    install_save_hooks(model)
    watch_training(model)  # warns if trained without MSQTrainer / MSQCallback / MSQController


def register() -> None:
    """Register ``MSQConfig`` and ``MSQQuantizer`` with transformers under ``"msq"`` (idempotent).

    Replaces the stand-in quantizer class that ``import msq_hf`` registers while this module is not loaded yet
    (marked ``msq_hf_stand_in``, see ``msq_hf/__init__.py``); ``import msq_hf`` calls this once it is loaded.
    """
    if getattr(auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD), "msq_hf_stand_in", False):
        del auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(MSQConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(MSQQuantizer)


__all__ = [
    "GUARD_KEY",
    "LOAD_GUARD",
    "MSQQuantizer",
    "attach_quantizer",
    "fit_timm_config",
    "install_save_hooks",
    "own_config",
    "own_tensors",
    "packed_root",
    "register",
    "register_save_hooks",
]
