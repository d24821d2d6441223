"""Reading a user's batch without changing it.

Every part of lightning_synth that looks inside a batch goes through a :class:`BatchAdapter`: it finds the
inputs, the class targets and any per-sample slice attributes, and it can write new inputs/targets back
into a batch (or a single sample) of the same structure, so synthetic data reach the user's
``training_step`` in the format it already expects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchAdapter", "BatchView", "resolve_batch_adapter"]

INPUT_KEYS = ("image", "images", "x", "input", "inputs", "pixel_values", "img", "data")
TARGET_KEYS = ("label", "labels", "y", "target", "targets", "class", "cls")
SLICE_KEYS = ("group", "groups", "slice", "attribute", "attributes")


@dataclass
class BatchView:
    """What an adapter read from a batch.

    Shape:
        - inputs: ``(B, ...)``, usually ``(B, C, H, W)``
        - targets: ``(B,)`` integer class indices
        - slices: name -> ``(B,)`` integer attribute values
    """

    inputs: Tensor
    targets: Tensor
    slices: dict[str, Tensor] = field(default_factory=dict)


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"Tensor(shape={tuple(batch.shape)}, dtype={batch.dtype})"
    if isinstance(batch, Mapping):
        return "dict(" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in batch.items()) + ")"
    if isinstance(batch, (list, tuple)):
        return type(batch).__name__ + "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


class BatchAdapter:
    """Finds inputs, targets and slice attributes in ``(x, y)`` tuples, lists and dicts.

    Args:
        input_key: dict key of the inputs; by default the first of ``image, images, x, input, inputs,
            pixel_values, img, data`` that is present.
        target_key: dict key of the integer class targets; by default the first of ``label, labels, y,
            target, targets, class, cls``.
        slice_keys: dict keys holding per-sample integer attributes (groups, metadata) to report
            per-slice metrics for; by default ``group``/``groups``/``slice``/``attribute(s)`` when present.
            For tuples, a third element that is an integer tensor is read as slice ``"group"`` and a
            third element that is a dict is read as named slices.

    Raises:
        TypeError: if a key is not a string.

    Example:
        >>> adapter = BatchAdapter()
        >>> view = adapter.unpack({"image": torch.zeros(2, 1, 4, 4), "label": torch.tensor([1, 0])})
        >>> view.targets.tolist()
        [1, 0]
        >>> adapter.pack((torch.zeros(2, 1, 4, 4), torch.tensor([1, 0])), torch.ones(1, 1, 4, 4),
        ...              torch.tensor([3]))[1].tolist()
        [3]
    """

    def __init__(
        self, input_key: str | None = None, target_key: str | None = None, slice_keys: Sequence[str] = ()
    ) -> None:
        for name, value in (("input_key", input_key), ("target_key", target_key)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"`{name}` must be a string or None, got {type(value).__name__}: {value!r}")
        if isinstance(slice_keys, str) or not all(isinstance(k, str) for k in slice_keys):
            raise TypeError(f"`slice_keys` must be a sequence of strings, got {slice_keys!r}")
        self.input_key = input_key
        self.target_key = target_key
        self.slice_keys = tuple(slice_keys)

    def _find_key(self, batch: Mapping[str, Any], explicit: str | None, candidates: tuple[str, ...]) -> str:
        if explicit is not None:
            if explicit not in batch:
                raise KeyError(
                    f"The batch has no key {explicit!r}; keys present: {sorted(map(str, batch))}. "
                    "Pass the right key to `BatchAdapter(input_key=..., target_key=...)`."
                )
            return explicit
        for key in candidates:
            if key in batch:
                return key
        raise KeyError(
            f"Cannot find one of {candidates} in the batch: {_describe(batch)}. Pass "
            "`batch_adapter=BatchAdapter(input_key=..., target_key=...)` or a callable returning "
            "(inputs, targets)."
        )

    def unpack(self, batch: Any) -> BatchView:
        """Read a collated batch (or one sample) into a :class:`BatchView`."""
        if isinstance(batch, Mapping):
            inputs = batch[self._find_key(batch, self.input_key, INPUT_KEYS)]
            targets = batch[self._find_key(batch, self.target_key, TARGET_KEYS)]
            keys = self.slice_keys or tuple(k for k in SLICE_KEYS if k in batch)
            slices = {k: _as_tensor(batch[k]) for k in keys if k in batch}
            missing = [k for k in self.slice_keys if k not in batch]
            if missing:
                raise KeyError(f"Slice keys {missing} are not in the batch; keys present: {sorted(batch)}.")
        elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
            inputs, targets = batch[0], batch[1]
            slices = _tuple_slices(batch[2]) if len(batch) >= 3 else {}
        else:
            raise TypeError(
                f"lightning_synth cannot read this batch: {_describe(batch)}. Batches must be (inputs, "
                "targets[, groups]) tuples/lists or dicts with an input key and a target key; otherwise pass "
                "`batch_adapter=` a `BatchAdapter` subclass or a callable returning (inputs, targets)."
            )
        return _checked(BatchView(_as_tensor(inputs), _as_tensor(targets), slices), batch)

    def pack(self, template: Any, inputs: Tensor, targets: Tensor) -> Any:
        """Return a batch with the structure of ``template`` holding ``inputs`` and ``targets``.

        Other fields of a dict template are dropped unless they are slice attributes, which are kept
        only when their length still matches.
        """
        if isinstance(template, Mapping):
            out = {
                self._find_key(template, self.input_key, INPUT_KEYS): inputs,
                self._find_key(template, self.target_key, TARGET_KEYS): targets,
            }
            return out
        if isinstance(template, (list, tuple)):
            return type(template)([inputs, targets]) if isinstance(template, list) else (inputs, targets)
        raise TypeError(f"Cannot write a batch shaped like {_describe(template)}; pass a custom adapter.")


class _CallableAdapter(BatchAdapter):
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.fn = fn

    def unpack(self, batch: Any) -> BatchView:
        out = self.fn(batch)
        if isinstance(out, BatchView):
            return out
        if isinstance(out, (tuple, list)) and len(out) in (2, 3):
            slices = dict(out[2]) if len(out) == 3 and out[2] is not None else {}
            return _checked(BatchView(_as_tensor(out[0]), _as_tensor(out[1]), slices), batch)
        raise TypeError(
            f"`batch_adapter` returned {_describe(out)}; it must return (inputs, targets), "
            "(inputs, targets, slices_dict) or a BatchView."
        )


def resolve_batch_adapter(value: BatchAdapter | Callable[[Any], Any] | None) -> BatchAdapter:
    """Turn the ``batch_adapter`` argument of a public class into a :class:`BatchAdapter`."""
    if value is None:
        return BatchAdapter()
    if isinstance(value, BatchAdapter):
        return value
    if callable(value):
        return _CallableAdapter(value)
    raise TypeError(
        f"`batch_adapter` must be a BatchAdapter, a callable or None, got {type(value).__name__}: {value!r}"
    )


def _as_tensor(value: Any) -> Tensor:
    return value if isinstance(value, Tensor) else torch.as_tensor(value)


def _tuple_slices(extra: Any) -> dict[str, Tensor]:
    if isinstance(extra, Mapping):
        return {str(k): _as_tensor(v) for k, v in extra.items()}
    tensor = _as_tensor(extra)
    if tensor.dtype.is_floating_point:
        return {}
    return {"group": tensor}


def _checked(view: BatchView, batch: Any) -> BatchView:
    if view.targets.dtype.is_floating_point or view.targets.dtype == torch.bool:
        raise TypeError(
            f"Targets must be integer class indices, got dtype {view.targets.dtype} from {_describe(batch)}. "
            "Pass `batch_adapter=` to say where the class indices are."
        )
    if view.inputs.ndim == 0 or (view.targets.ndim == 1 and view.inputs.shape[0] != view.targets.shape[0]):
        raise ValueError(
            f"Inputs and targets disagree on the batch size in {_describe(batch)}. "
            "Pass `batch_adapter=` to say where the inputs and targets are."
        )
    return view
