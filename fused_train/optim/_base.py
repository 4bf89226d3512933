"""What every fused_train optimizer shares: argument policy, lazy state, cached per-(device, dtype) tables,
GradScaler hand-off, in-step gradient zeroing and torch.optim-compatible checkpoints.

A subclass names its state (``_state_names``), creates it (``_init_state``) and calls its op
(``_step_bucket``); everything else lives here.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from itertools import chain
from typing import Any, Callable

import torch
from torch import Tensor

from . import _quantization

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def state_dtype_for(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state is kept in the kernels' math type: fp32 for bf16/fp16 params."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def check_implementation_flags(name: str, foreach: bool | None, fused: bool | None, differentiable: bool) -> None:
    """torch.optim's implementation switches, accepted for drop-in compatibility where they agree with
    what fused_train does (always one fused kernel per device and dtype) and refused where they don't."""
    if foreach:
        raise ValueError(
            f"{name}: foreach=True asks for torch's foreach implementation; fused_train always runs its fused "
            f"kernel. Leave foreach unset (or use torch.optim.{name})."
        )
    if fused is False:
        raise ValueError(
            f"{name}: fused=False asks for an unfused implementation; fused_train.optim.{name} is always fused. "
            f"Leave fused unset (or use torch.optim.{name})."
        )
    if differentiable:
        raise ValueError(
            f"{name}: differentiable=True is not supported: the fused kernel updates params in place outside "
            "autograd. Use torch.optim for differentiable optimization."
        )


def check_stochastic_round(name: str, bf16_stochastic_round: Any) -> None:
    if not isinstance(bf16_stochastic_round, bool):
        raise ValueError(f"{name}: bf16_stochastic_round must be True or False, got {bf16_stochastic_round!r}")


def check_lr(lr: float | Tensor) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


class _Bucket:
    """The params of one group that share a device and dtype, with their state lists, in call order."""

    __slots__ = ("indices", "originals", "params", "states", "steps", "rounding_seeds", "rounding_offsets",
                 "needs_view")

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.originals: list[Tensor] = []  # the group's params
        self.params: list[Tensor] = []  # what the op sees: see _kernel_view
        self.states: dict[str, list[Tensor]] = {}
        self.steps: list[Tensor] = []
        self.rounding_seeds: list[Tensor] | None = None  # bf16 params of a bf16_stochastic_round group
        # with the seeds, where a param is a shard: the index in its whole tensor of each one's element 0
        self.rounding_offsets: list[int] | None = None
        self.needs_view = False  # complex or DTensor params: grads need _kernel_view too


def _same_objects(a: list, b: list) -> bool:
    """Whether a and b hold the very same objects, in order. Identity, never ==: Tensor.__eq__ is elementwise.
    Eager, map/operator.is_ run as one C loop; traced, the ids of tensors are compared instead, which torch
    2.5's dynamo can follow (it cannot trace `is` or id() on dicts, nor map over operator.is_)."""
    if len(a) != len(b):
        return False
    if torch.compiler.is_compiling():
        return all(id(x) == id(y) for x, y in zip(a, b))
    return all(map(operator.is_, a, b))


def _state_tensors(dicts: list) -> list:
    # A replaced state dict holds new tensors (or none), so comparing the tensors covers it too.
    return [v for d in dicts if d for v in d.values() if isinstance(v, Tensor)]


class _GroupTable:
    """A group's buckets and what they were built from, reused while the group still holds the same params (the
    same objects, in order) and the options that decide which state exists are unchanged. The state they hold is
    checked once per step for the whole optimizer (_StateSnapshot)."""

    __slots__ = ("group", "has_grad", "options", "params", "buckets", "state_values")

    def __init__(self, optimizer: "FusedOptimizer", group: dict[str, Any], has_grad: tuple[bool, ...],
                 buckets: list[_Bucket]) -> None:
        self.group = group
        self.has_grad = has_grad
        self.options = optimizer._table_options(group)
        self.params = list(group["params"])  # also keeps the ids compared alive
        self.buckets = buckets
        # (Comprehensions, not map/filter over builtins: this and state_unchanged are traced by torch.compile,
        # whose torch 2.5 version cannot trace those.)
        self.state_values = _state_tensors([optimizer.state.get(p) for p in self.params])

    def still_valid(self, optimizer: "FusedOptimizer", group: dict[str, Any], has_grad: tuple[bool, ...]) -> bool:
        # (Traced, the group dict itself is not compared: torch 2.5's dynamo cannot; its params are.)
        return ((torch.compiler.is_compiling() or self.group is group) and self.has_grad == has_grad
                and _same_objects(group["params"], self.params) and optimizer._table_options(group) == self.options)

    def state_unchanged(self, state: dict) -> bool:
        """This group's share of _StateSnapshot.matches, by looking each param up: the form torch.compile traces
        without guarding on the identity of every gradient (walking ``state`` itself makes it do so)."""
        return _same_objects(_state_tensors([state.get(p) for p in self.params]), self.state_values)


class _StateSnapshot:
    """``optimizer.state`` as the cached tables saw it: the container, each param's state dict and every value in
    them, as objects. Any change torch.optim would honour — ``state.clear()``, a new ``state`` dict, a param's
    state dict replaced, a state tensor re-assigned (moving state between devices or dtypes) — shows up as a
    different object here, and the tables are rebuilt from the state as it now is. Walking the values in the
    dict's own order needs no tensor hashing: a few microseconds per thousand params."""

    __slots__ = ("state", "dicts", "values")

    def __init__(self, state: dict) -> None:
        self.state = state
        self.dicts = list(state.values())  # references keep the ids compared alive
        self.values = list(chain.from_iterable(map(dict.values, self.dicts)))

    def matches(self, state: dict) -> bool:
        if state is not self.state:
            return False
        dicts = list(state.values())
        return _same_objects(dicts, self.dicts) and _same_objects(
            list(chain.from_iterable(map(dict.values, dicts))), self.values)


class FusedOptimizer(torch.optim.Optimizer):
    """Base of fused_train's optimizers; not used directly."""

    #: state keys handed to the op, in order (a subclass sets these)
    _state_names: tuple[str, ...] = ()
    #: whether the state holds a per-param ``step`` tensor
    _has_step: bool = True
    #: the position of this optimizer's first param among those whose rounding seeds must differ
    #: (OptimizerInBackward gives each param an optimizer of its own)
    _rounding_position_base: int = 0
    #: the state kept in the param's shape and the kernels' math type (a subclass with other state narrows it)
    @property
    def _full_precision_state_names(self) -> tuple[str, ...]:
        return self._state_names

    def __init__(self, params: Any, defaults: dict[str, Any], *, zero_grad_in_step: bool | None = None) -> None:
        if zero_grad_in_step not in (None, True, False):
            raise ValueError(f"zero_grad_in_step must be None, True or False, got {zero_grad_in_step!r}")
        # Optimizer's own, by name: each subclass also derives from its torch.optim class (for isinstance), whose
        # __init__ takes other arguments and must not run.
        torch.optim.Optimizer.__init__(self, params, defaults)
        # GradScaler hands grad_scale/found_inf to step() instead of unscaling and syncing itself.
        self._step_supports_amp_scaling = True
        self._zero_grad_in_step = zero_grad_in_step
        self._grads_kept_allocated = False  # the last zero_grad() kept grads (set_to_none=False)
        self._zeroed_grads: dict[int, tuple[Tensor, int]] = {}
        self._tables: dict[int, _GroupTable] = {}
        # One slot, mutated in place (a compiled step may mutate containers, but dynamo refuses to rebind
        # attributes inside a traced region).
        self._state_snapshot: list[_StateSnapshot | None] = [None]

    # ------------------------------------------------------------------------------------------------
    # Subclass interface
    def _init_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _ensure_state(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Creates state that options switched on later need (e.g. amsgrad after the first step)."""

    def _step_bucket(self, group: dict[str, Any], bucket: _Bucket, params: list[Tensor], grads: list[Tensor],
                     states: dict[str, list[Tensor]], steps: list[Tensor], *, zero_grad: bool,
                     lr: float, lr_tensor: Tensor | None, grad_scale: Tensor | None,
                     found_inf: Tensor | None) -> None:
        raise NotImplementedError

    def _init_group(self, *args: Any, **kwargs: Any) -> Any:
        # Inherited from the torch.optim class otherwise, where it would run torch's state setup on ours.
        raise NotImplementedError(
            f"fused_train.optim.{type(self).__name__} steps in its fused kernel; torch.optim's _init_group does "
            "not apply to it"
        )

    # ------------------------------------------------------------------------------------------------
    def _new_step_tensor(self, param: Tensor) -> Tensor:
        # As torch's fused and capturable optimizers: fp32, on the param's device, advanced by the kernel.
        return torch.zeros((), dtype=torch.float32, device=param.device)

    def _zeros_state(self, param: Tensor) -> Tensor:
        return torch.zeros_like(param, dtype=_state_like_dtype(param), memory_format=torch.preserve_format)

    def _bucket_kind(self, p: Tensor, state: dict[str, Any]) -> Any:
        """Params of one device and dtype that need different ops (8-bit and full-precision state) go to
        different buckets by this."""
        return None

    def _state_options(self, group: dict[str, Any]) -> tuple:
        """The group options that decide which state exists (a subclass adds e.g. amsgrad): switching one on
        rebuilds the tables, so the state it needs is created at that step, as torch.optim does."""
        return ()

    def _table_options(self, group: dict[str, Any]) -> tuple:
        return self._state_options(group), _stochastic_rounding(group)

    def _tables_for(self, group_index: int, group: dict[str, Any], has_grad: tuple[bool, ...],
                    rebuilt: list[int]) -> list[_Bucket]:
        cached = self._tables.get(group_index)
        if cached is not None and cached.still_valid(self, group, has_grad) and (
                not torch.compiler.is_compiling() or cached.state_unchanged(self.state)):
            return cached.buckets
        buckets: dict[tuple, _Bucket] = {}
        if "bf16_stochastic_round" in group:  # (a group dict may set it too)
            check_stochastic_round(type(self).__name__, group["bf16_stochastic_round"])
        # The params' positions in the whole optimizer (as state_dict numbers them): each one's rounding seed.
        first_position = self._rounding_position_base + sum(
            len(g["params"]) for g in self.param_groups[:group_index])
        for i, p in enumerate(group["params"]):
            if not has_grad[i]:
                continue
            _check_param(p)
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, group, state)
            self._ensure_state(p, group, state)
            rounds = _rounds_stochastically(group, p)
            if rounds:
                self._ensure_rounding_state(p, state, first_position + i)
            self._check_state(p, group, state)
            key = (p.device, p.dtype, self._bucket_kind(p, state))
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Bucket()
                bucket.needs_view = p.is_complex() or _is_dtensor(p)
                bucket.states = {name: [] for name in self._state_names}
                if rounds:
                    bucket.rounding_seeds = []
                    bucket.rounding_offsets = []
            bucket.indices.append(i)
            bucket.originals.append(p)
            bucket.params.append(_kernel_view(p))
            for name in self._state_names:
                value = state.get(name)
                bucket.states[name].append(_kernel_view(value) if value is not None else None)
            if self._has_step or rounds:
                bucket.steps.append(state["step"])
            if rounds:
                bucket.rounding_seeds.append(state["rounding_seed"])
                bucket.rounding_offsets.append(_rounding_offset(p) if _is_dtensor(p) else 0)
        result = list(buckets.values())
        for bucket in result:
            if bucket.rounding_offsets is not None and not any(bucket.rounding_offsets):
                bucket.rounding_offsets = None  # (the op's default: plain tensors' calls stay as they were)
        self._tables[group_index] = _GroupTable(self, group, has_grad, result)
        rebuilt.append(group_index)
        return result

    def _ensure_rounding_state(self, p: Tensor, state: dict[str, Any], position: int) -> None:
        """What bf16_stochastic_round needs of a bf16 param's state: its rounding seed (an int64 0-dim tensor on the
        param's device; created from the param's position among the optimizer's params, so every run, every DDP
        rank and a resumed run draw the same bits) and a ``step``, the rounding's counter (SGD keeps one for this
        alone; _check_state brings it into the kernels' layout). The counter is fp32, as torch's steps: past 2^24
        steps it stops advancing, and each element's bits then repeat from step to step."""
        seed = state.get("rounding_seed")
        if seed is None:
            state["rounding_seed"] = torch.tensor(_position_seed(position), dtype=torch.int64, device=p.device)
        elif not (isinstance(seed, Tensor) and seed.dtype == torch.int64 and seed.device == p.device
                  and seed.dim() == 0):
            integral = isinstance(seed, int) or (isinstance(seed, Tensor) and seed.numel() == 1
                                                 and not seed.is_floating_point() and not seed.is_complex())
            if not integral:
                raise TypeError(f"{type(self).__name__}: state 'rounding_seed' must be an int or a one-element integer "
                                f"tensor, got {seed!r}")
            state["rounding_seed"] = torch.as_tensor(seed).detach().to(device=p.device, dtype=torch.int64,
                                                                        copy=True).reshape(())
        if state.get("step") is None:
            state["step"] = self._new_step_tensor(p)

    def _check_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Brings state that a user assigned (or a checkpoint loaded) into the layout the kernels read, in
        place in ``state``, as torch.optim would use it: ``step`` as an fp32 tensor on the param's device (it
        may have been moved, or be a number), moments in the kernels' math type (fp32 for bf16/fp16 params).
        State on another device than its param, or of another shape, raises: torch's fused step raises too,
        and moving it silently would undo an offload the user meant."""
        if self._has_step or _rounds_stochastically(group, p):
            step = state.get("step")
            if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.device == p.device
                    and step.dim() == 0):
                if step is None:
                    raise KeyError(f"{type(self).__name__}: the state of a param has no 'step'")
                state["step"] = _step_tensor(step, p.device)
        self._convert_state(p, group, state)
        dtype = _state_like_dtype(p)
        for name in self._full_precision_state_names:
            value = state.get(name)
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"{type(self).__name__}: state '{name}' must be a tensor, got {type(value).__name__}")
            if _is_dtensor(p) and not _is_dtensor(value) and value.shape == p.shape:
                value = state[name] = _as_shards_of(p, value)  # a checkpoint's whole tensor: this rank's part
            if not _placed_like(p, value):
                raise _placement_error(self, name, p, value)
            if value.device != p.device:
                raise ValueError(
                    f"{type(self).__name__}: state '{name}' is on {value.device} but its param is on {p.device}; "
                    f"the fused step needs them on the same device (move the state back before stepping)"
                )
            if value.shape != p.shape:
                raise ValueError(
                    f"{type(self).__name__}: state '{name}' has shape {tuple(value.shape)} but its param has "
                    f"{tuple(p.shape)}"
                )
            if value.dtype != dtype:
                state[name] = value.detach().to(dtype)

    def _convert_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Brings a param's state into the form this optimizer keeps, in place. Full-precision optimizers take an
        8-bit optimizer's moments (``<name>_codes`` and ``<name>_absmax``) by dequantizing them."""
        from ._state8bit import dequantize_moment  # (it imports this module)

        for name in self._state_names:
            codes, absmax = state.get(f"{name}_codes"), state.get(f"{name}_absmax")
            if isinstance(codes, Tensor) and isinstance(absmax, Tensor):
                values = dequantize_moment(codes, absmax, signed=_quantization.MOMENT_IS_SIGNED[name])
                values = values.to(device=p.device, dtype=_state_like_dtype(p))
                values = values if values.shape == p.shape else values.reshape(p.shape)
                # (8-bit state of the whole param, e.g. one process's checkpoint, for a shard: this rank's part)
                state[name] = _as_shards_of(p, values) if _is_dtensor(p) and not _is_dtensor(values) else values
                del state[f"{name}_codes"], state[f"{name}_absmax"]

    def _invalidate_tables(self) -> None:
        self._tables.clear()
        self._state_snapshot[0] = None

    # Kept out of torch.compile's trace, as torch.optim.Optimizer keeps its own add_param_group, zero_grad and
    # load_state_dict: they rebind attributes, which dynamo refuses inside a traced region (torch 2.11).
    @torch._disable_dynamo
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_tables"):
            self._invalidate_tables()

    def _wants_zero_grad_in_step(self) -> bool:
        if self._zero_grad_in_step is not None:
            return self._zero_grad_in_step
        # Auto: zero in the step only when the loop keeps gradients allocated (zero_grad(set_to_none=False));
        # with set_to_none=True the grads are dropped anyway and writing zeros would be wasted traffic.
        return self._grads_kept_allocated

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one optimization step over every param group.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        zero_grad = self._wants_zero_grad_in_step()
        zeroed: dict[int, tuple[Tensor, int]] = {}
        per_device_scalars: dict[tuple[int, torch.device], Tensor] = {}

        # First every group's tables (this validates dtypes and creates missing state), then the kernels:
        # a bad param in a later group must not leave earlier groups stepped.
        compiling = torch.compiler.is_compiling()
        snapshot = self._state_snapshot[0]
        if not compiling and (snapshot is None or not snapshot.matches(self.state)):
            self._tables.clear()  # (compiled, each group checks its own state in _tables_for)
        rebuilt: list[int] = []
        work = []
        for group_index, group in enumerate(self.param_groups):
            grads = [p.grad for p in group["params"]]
            has_grad = tuple(g is not None for g in grads)
            if not any(has_grad):
                continue
            for g in grads:
                if g is not None and g.layout != torch.strided:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (got layout {g.layout}); "
                        "use torch.optim.SparseAdam or dense gradients"
                    )
            work.append((group, grads, self._tables_for(group_index, group, has_grad, rebuilt)))
        if (rebuilt or snapshot is None) and not compiling:
            # Building tables creates and converts state: what the next step compares against is the state now.
            self._state_snapshot[0] = _StateSnapshot(self.state)

        for group, grads, buckets in work:
            lr = group["lr"]
            if compiling and not isinstance(lr, Tensor):
                # Traced, a float lr would be a constant of the graph and every scheduler step a recompile
                # (torch.optim's compiled steps keep it symbolic); as a tensor it is an input of the graph.
                # (A product, not torch.tensor(lr): that one dynamo specializes on the value.)
                lr = torch.ones((), dtype=torch.float64) * lr
            for bucket in buckets:
                bucket_grads = [grads[i] for i in bucket.indices]
                if bucket.needs_view:
                    bucket_grads = [_kernel_view(g) for g in bucket_grads]
                device = bucket.params[0].device
                lr_tensor = None
                lr_value = lr
                if isinstance(lr, Tensor):
                    lr_tensor = _on_device(lr, device, per_device_scalars)
                    lr_value = 0.0
                self._step_bucket(
                    group, bucket, bucket.params, bucket_grads, bucket.states, bucket.steps,
                    zero_grad=zero_grad, lr=float(lr_value), lr_tensor=lr_tensor,
                    grad_scale=_on_device(grad_scale, device, per_device_scalars),
                    found_inf=_on_device(found_inf, device, per_device_scalars),
                )
                if zero_grad:
                    for i in bucket.indices:
                        g = grads[i]
                        zeroed[id(g)] = (g, g._version)
        # Updated in place, not rebound: a compiled step may mutate existing containers (as torch.optim's
        # steps do with self.state), but dynamo in torch 2.11 refuses to rebind an attribute.
        self._zeroed_grads.clear()
        self._zeroed_grads.update(zeroed)
        return loss

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the gradients of all params, as :meth:`torch.optim.Optimizer.zero_grad`.

        With ``set_to_none=False`` the gradients the last step already zeroed in its kernel (and that
        nothing has written to since) are not written again, and later steps zero the gradients they
        consume, so a loop that keeps gradients allocated never pays a separate zeroing pass.
        """
        self._grads_kept_allocated = not set_to_none
        if set_to_none:
            super().zero_grad(set_to_none=True)
            return
        zeroed = self._zeroed_grads
        to_zero: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                known = zeroed.get(id(g))
                if known is not None and known[0] is g and known[1] == g._version:
                    continue
                to_zero[(g.device, g.dtype)].append(g)
        for grads in to_zero.values():
            torch._foreach_zero_(grads)
        self._zeroed_grads = {}

    # ------------------------------------------------------------------------------------------------
    # Checkpoints in torch.optim's format
    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by this class or by the torch.optim class of the same name.

        torch.optim casts state to each param's dtype on load; fused_train keeps fp32 state for bf16/fp16
        params and its ``step`` as an fp32 tensor on the param's device, so those are taken from the
        saved values directly (no lossy round trip through bf16). Load-state-dict hooks run as in torch: the
        values taken are those the pre-hooks hand on, and post-hooks see (and may replace) the loaded state.
        """
        loaded: list[dict[str, Any]] = []
        before: list[set[str]] = []  # each param's state keys before the load

        def capture(optimizer: torch.optim.Optimizer, incoming: dict[str, Any]) -> None:
            loaded.append(incoming)  # registered last: sees what the user's pre-hooks hand to torch
            before[:] = [set(self.state[p]) if p in self.state else set()
                         for g in self.param_groups for p in g["params"]]

        def restore_precision(optimizer: torch.optim.Optimizer) -> None:
            self._restore_state_precision(loaded[-1], before)  # prepended: before the user's post-hooks

        # A checkpoint whose groups do not say (torch.optim's, or one saved before the option) keeps the choice this
        # optimizer was built with; torch's load would drop the key with the old group.
        rounding = [group.get("bf16_stochastic_round") for group in self.param_groups]
        pre = self.register_load_state_dict_pre_hook(capture)
        post = self.register_load_state_dict_post_hook(restore_precision, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
        for group, choice in zip(self.param_groups, rounding):
            if choice is not None:
                group.setdefault("bf16_stochastic_round", choice)
        self._invalidate_tables()
        self._zeroed_grads = {}

    def _restore_state_precision(self, state_dict: dict[str, Any], before: list[set[str]] | None = None) -> None:
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for index, (saved_id, (p, group)) in enumerate(zip(saved_ids, params)):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            fresh = _fresh_forms(saved, before[index]) if before else set()
            for key in fresh:
                state.pop(key, None)
            for key, value in saved.items():
                if key in fresh:
                    continue
                if key == "step":
                    state[key] = _step_tensor(value, p.device)
                elif key == "rounding_seed":
                    # torch cast it to the param's dtype: taken as saved instead. A seed saved as a float (a checkpoint
                    # that went through torch.optim, which cast it to bf16) has lost its bits: dropped, the next step
                    # makes it again from the param's position.
                    if torch.is_tensor(value) and (value.is_floating_point() or value.is_complex()):
                        state.pop(key, None)
                    else:
                        state[key] = torch.as_tensor(value).detach().to(device=p.device, dtype=torch.int64, copy=True)
                elif key.endswith("_codes") or key.endswith("_absmax"):
                    # 8-bit state: torch cast it to the param's dtype; taken as saved (uint8 codes, fp32 absmax)
                    state[key] = value.detach().to(device=p.device, copy=True)
                elif torch.is_tensor(value) and (value.is_floating_point() or value.is_complex()):
                    state[key] = value.detach().to(device=p.device, dtype=_state_like_dtype(p), copy=True)
            self._convert_state(p, group, state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        torch.optim.Optimizer.__setstate__(self, state)  # not the torch.optim subclass's: see __init__
        self._tables = {}
        self._state_snapshot = [None]
        self._zeroed_grads = {}
        self.__dict__.setdefault("_zero_grad_in_step", None)
        self.__dict__.setdefault("_grads_kept_allocated", False)
        self._step_supports_amp_scaling = True


def _fresh_forms(saved: dict[str, Any], keys_before: set[str]) -> set[str]:
    """The keys to drop where a moment is loaded in both forms, full precision (``exp_avg``) and 8-bit
    (``exp_avg_codes``, ``_absmax``): torch's full_state_dict loader at work, which merges the state of a zero step of
    the fresh optimizer into what it loads. The form the fresh state had (its keys before the load) is the fresh
    one; the checkpoint's form is kept."""
    fresh: set[str] = set()
    for name in _quantization.MOMENT_IS_SIGNED:
        quantized = (f"{name}_codes", f"{name}_absmax")
        if name not in saved or quantized[0] not in saved:
            continue
        if quantized[0] in keys_before and name not in keys_before:
            fresh.update(quantized)
        elif name in keys_before and quantized[0] not in keys_before:
            fresh.add(name)
    return fresh


def _stochastic_rounding(group: dict[str, Any]) -> bool:
    # (A branch, not bool(...) of the value: see SGD._state_options.)
    return True if group.get("bf16_stochastic_round", False) else False


def _rounds_stochastically(group: dict[str, Any], p: Tensor) -> bool:
    return _stochastic_rounding(group) and p.dtype == torch.bfloat16


def _position_seed(position: int) -> int:
    """A param's rounding seed from its position in the optimizer: splitmix64 of the position, as a signed int64."""
    mask = (1 << 64) - 1
    z = (position + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


def _step_tensor(step: Any, device: torch.device) -> Tensor:
    """A saved or assigned ``step`` (tensor or number) as the kernels keep it: a 0-dim fp32 tensor of its own on
    the param's device."""
    return torch.as_tensor(step).detach().to(device=device, dtype=torch.float32, copy=True).reshape(())


def _state_like_dtype(param: Tensor) -> torch.dtype:
    if param.is_complex():
        return torch.complex128 if param.dtype == torch.complex128 else torch.complex64
    return state_dtype_for(param.dtype)


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


def _rounding_offset(p: Tensor) -> int:
    """Where a DTensor param's local shard draws its stochastic-rounding bits from: the index, in the whole tensor,
    of the shard's element 0, so that the shards of one tensor round as the whole tensor would on one device, and
    replicas (Replicate placements, HSDP) alike. That holds where the shard is one run of the whole tensor's
    elements in order (dim-0 sharding, FSDP2's default, even or uneven). A shard of another cut (a Shard(1), or
    _StridedShard's interleaved rows) is given L * numel instead, L being its first element's index in the whole
    tensor: a range of indices no other shard of the tensor uses, so the shards still draw different bits, though
    not the whole tensor's."""
    global_shape = tuple(p.shape)
    local = p._local_tensor
    offsets = _shard_offsets(p)
    if local.numel() == 0 or offsets is None:  # nothing to round, or a rank outside the mesh
        return 0
    stride = 1
    first = 0
    for size, offset in zip(reversed(global_shape), reversed(offsets)):
        first += offset * stride
        stride *= size
    local_shape = tuple(local.shape)
    cut = [d for d, (a, b) in enumerate(zip(local_shape, global_shape)) if a != b]
    # One run in order: every dim after the first cut one whole, every dim before it of size 1, and the local
    # tensor stepped in that order (contiguous).
    # (From shapes alone: so only for cuts DTensor makes in order, not _StridedShard's interleaved rows.)
    in_order = _chunked_placements(p) and (not cut or (
        all(local_shape[d] == global_shape[d] for d in range(cut[0] + 1, len(global_shape)))
        and all(global_shape[d] == 1 for d in range(cut[0]))))
    index = first if in_order and local.is_contiguous() else first * p.numel()
    index %= 1 << 64
    return index - (1 << 64) if index >= 1 << 63 else index  # (the op's int64; it counts modulo 2^64)


def _chunked_placements(p: Tensor) -> bool:
    """Whether a DTensor's placements are all Shard, Replicate or Partial: cuts into torch.chunk's contiguous pieces
    (not _StridedShard's interleaved ones, a subclass of Shard, hence the exact names)."""
    return all(type(placement).__name__ in ("Shard", "Replicate", "Partial") for placement in p.placements)


def _shard_offsets(p: Tensor) -> list[int] | None:
    """The index, along each dim of the whole tensor, of a DTensor's local shard's first element (None on a rank
    outside its mesh). Shard and Replicate (and Partial) placements are cut here as DTensor cuts them (see
    _chunk_of); any other placement (_StridedShard: FSDP2 over tensor parallelism) asks DTensor, whose answer reads
    the coordinate as a tensor (a graph break where the step is compiled, once, when the step's tables are built)."""
    mesh, placements = p.device_mesh, p.placements
    if not _chunked_placements(p):
        try:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        except ImportError:  # torch < 2.5
            from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
        _, offsets = compute_local_shape_and_global_offset(tuple(p.shape), mesh, placements)
        return list(offsets) if len(offsets) == p.dim() else None
    chunk = _chunk_of(tuple(p.shape), p)
    return None if chunk is None else chunk[0]


def _chunk_of(shape: tuple[int, ...], p: Tensor) -> tuple[list[int], list[int]] | None:
    """(offsets, sizes) of this rank's part of a tensor of ``shape`` placed as the DTensor ``p`` (Shard, Replicate or
    Partial placements), cut as DTensor cuts: torch.chunk's sizes along each Shard's dim, mesh dims in order. From
    the mesh coordinate, which torch.compile reads as constants. None on a rank outside the mesh."""
    mesh = p.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    sizes, offsets = list(shape), [0] * len(shape)
    for mesh_dim, placement in enumerate(p.placements):
        if type(placement).__name__ != "Shard":
            continue
        dim, chunks = placement.dim % p.dim(), mesh.size(mesh_dim)
        chunk = -(-sizes[dim] // chunks)
        start = min(sizes[dim], chunk * coordinate[mesh_dim])
        sizes[dim] = max(0, min(sizes[dim], start + chunk) - start)
        offsets[dim] += start
    return offsets, sizes


def _as_shards_of(p: Tensor, whole: Tensor) -> Tensor:
    """A plain state tensor of the whole DTensor param ``p`` (of ``p``'s shape, or an 8-bit absmax's (rows, k), cut
    as ``p``'s blocks are) as this rank's part of it, a DTensor placed as ``p``: a checkpoint's whole state (e.g.
    torch's full_state_dict loading a key the local state lacked). Every rank holds the whole, so the cut is local:
    no collective."""
    chunk = _chunk_of(tuple(whole.shape), p) if _chunked_placements(p) else None
    if chunk is None and p._local_tensor.numel():
        raise ValueError(f"a state tensor of the whole param cannot be cut as a DTensor placed {tuple(p.placements)}; "
                         "load it sharded (torch.distributed.checkpoint) instead")
    offsets, sizes = chunk or ([0] * whole.dim(), [0] * whole.dim())
    part = whole[tuple(slice(offset, offset + size) for offset, size in zip(offsets, sizes))]
    return _placed_as(p, part.to(p._local_tensor.device).contiguous(), tuple(whole.shape))


def _placed_as(p: Tensor, local: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``local`` (this rank's part of a contiguous state tensor of ``shape``) as a DTensor placed as the param ``p``."""
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * max(shape[d + 1], 1)
    return type(p).from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=tuple(strides))


def _placed_like(p: Tensor, value: Tensor) -> bool:
    """Whether a state tensor is cut as its param: both plain tensors, or DTensors on one mesh, placed alike."""
    if not _is_dtensor(p):
        return not _is_dtensor(value)
    return _is_dtensor(value) and value.device_mesh == p.device_mesh and tuple(value.placements) == tuple(
        p.placements)


def _placement_error(optimizer: Any, name: str, p: Tensor, value: Tensor) -> ValueError:
    def placed(t: Tensor) -> str:
        return f"a DTensor placed {tuple(t.placements)} on {t.device_mesh}" if _is_dtensor(t) else "a plain tensor"

    return ValueError(f"{type(optimizer).__name__}: state '{name}' must be cut as its param: the param is "
                      f"{placed(p)}, the state {placed(value)}")


def _kernel_view(t: Tensor) -> Tensor:
    """What the kernel steps for a param, grad or state tensor. A DTensor (FSDP2) is stepped on its local
    shard: the update is elementwise, so every rank updating its own shard is the whole update. Complex
    tensors step as (…, 2) real views, exactly as torch.optim's own complex path does."""
    if _is_dtensor(t):
        t = t._local_tensor
    return torch.view_as_real(t) if t.is_complex() else t


def _check_param(p: Tensor) -> None:
    dtype = p.dtype
    if p.is_complex():
        dtype = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(p.dtype)
        if dtype is None:
            raise TypeError(f"fused_train optimizers support complex64 and complex128 params, got {p.dtype}")
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"fused_train optimizers support float32, float64, bfloat16 and float16 params, got {p.dtype}"
        )


def _on_device(t: Tensor | None, device: torch.device, cache: dict) -> Tensor | None:
    if t is None or t.device == device:
        return t
    key = (id(t), device)
    moved = cache.get(key)
    if moved is None:
        moved = cache[key] = t.to(device, non_blocking=True)
    return moved
