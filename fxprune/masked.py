"""The masked-parameter module: one parameter, one mask buffer.

Every targeted parameter of a prepared model lives in exactly one
:class:`MaskedParameter`; the graph calls it where the parameter used to be
read, and its output is the effective weight ``param * mask``.

Why not simply ``param * mask`` every forward (as ``torch.nn.utils.prune``
does)? Because that costs a pass over the weight in the forward as well as
one in the backward. Instead the pruner keeps the *stored* pruned entries at
exactly zero (it re-zeroes them whenever the optimizer touched the tensor).
When the stored tensor is known to be clean -- its autograd version counter
has not moved since the last re-zeroing -- the forward returns the parameter
itself and only the gradient pays for the mask, once per backward and in
place: see :class:`_GradientMask`. When it may be dirty (after
``optimizer.step()`` and before the next hook, or under ``torch.compile``),
the forward multiplies, so the effective weight is exact in every case.

What the mask is multiplied as (measured on CPU, one thread, 64K-4M
entries): a float copy of the mask in the parameter's dtype is the fastest
multiplier, ~1.7x faster than the mask's bytes (``mask.view(torch.uint8)``)
and ~10x faster than the bool tensor itself (which the multiply converts
element by element), but it costs as much memory as the weight. So it is
kept only where it pays: on the per-step training path (gradient masking,
re-zeroing after ``optimizer.step()``, the forward of a dirty weight) and on
CPU. Mask updates, :func:`fxprune.convert` and every accelerator use the
uint8 view, which costs no memory (on a GPU the multiply is bandwidth-bound
and casts inside the kernel, so one byte per entry should read faster than
four; not measured here, no GPU was at hand). ``float_copy = False``
(see :attr:`fxprune.Pruner.float_mask_copies`) drops it on CPU too.
"""
from __future__ import annotations

import sys
import weakref

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils.hooks import RemovableHandle

__all__ = ["MaskedParameter"]


class MaskedParameter(nn.Module):
    """A parameter together with its keep-mask (``True`` = kept).

    ``param`` is the trainable tensor (the optimizer sees it under the prepared
    model's ``named_parameters()``); ``mask`` is a bool buffer of the same shape.
    Both are in the prepared model's ``state_dict()``. The mask stays ``bool``
    under ``model.to(dtype)`` / ``.half()`` (only floating tensors are
    converted) and follows the parameter under ``model.to(device)``.
    """

    def __init__(self, param: nn.Parameter):
        super().__init__()
        self.param = param
        self.register_buffer("mask", torch.ones_like(param, dtype=torch.bool, device=param.device))
        self._clean_version = -1
        self._has_pruned = False  # all-True mask: the forward is the parameter itself
        self._keep: torch.Tensor | None = None  # float copy of the mask, see keep()
        self._keep_key: tuple | None = None
        self.float_copy = True  # keep() may cache a float copy (CPU only); see the module docstring
        self._grad_mask: _GradientMask | None = None  # the hooks on ``param``
        # How many attached optimizers watch this weight's steps (fxprune.zero_preserving). Without one, a
        # gradient means some step we do not see may change the weight, and fused optimizers do so without
        # moving its version counter: the weight is no longer known clean once it has a gradient.
        self.optimizer_watched = 0
        # The parameter object they are on, held here and not by the hooks (a weak reference would keep
        # ``torch.utils.swap_tensors`` from swapping it; a strong one from the hooks, a cycle through it).
        # In the instance dict: an attribute set to a Parameter would register a second parameter.
        self.__dict__["_hooked"] = None
        self._hook_gradients(param)

    def forward(self) -> torch.Tensor:
        # Runs once per weight per forward: plain dict reads instead of nn.Module attribute lookups.
        param = self._parameters["param"]
        # Compiled or fx-traced graphs always multiply: the version-counter check is eager-only Python state.
        if torch.compiler.is_compiling() or is_fx_symbolic_tracing():
            return param * self._buffers["mask"] if self._has_pruned else param
        if not self._has_pruned:
            return param
        if self._hooked is not param:
            # Not the parameter the hooks are on: a tensor swapped in for one call
            # (torch.func.functional_call, an EMA model's parameters) or one the user assigned. Moving the
            # hooks to it would unhook the real one while its graph may still be pending: multiply instead.
            # (A mask update, load_state_dict or module.to() adopts an assigned parameter.)
            if "_fsdp_sharded" in self.__dict__:  # FSDP2's gathered copy of clean shards (fxprune.fsdp)
                return _fsdp().unsharded_weight(self, param)
            return param * self.keep()
        self._adopt(param)  # swapped in place (swap_tensors) or unfrozen since hooked
        if param._version == self._clean_version:
            return param  # its gradient is masked by the hooks
        return param * self.keep()

    def _adopt(self, param: torch.Tensor) -> None:
        """Make the hooks be on ``param`` unless they already are (same object, same tensor, hooked if it
        requires gradients)."""
        grad_mask = self._grad_mask
        if (grad_mask is None or self._hooked is not param or grad_mask.cdata != param._cdata
                or (param.requires_grad and not grad_mask.handles)):
            self._hook_gradients(param)

    def _hook_gradients(self, param: torch.Tensor) -> None:
        """Put the gradient-masking hooks on ``param`` (the module's own leaf parameter) and nowhere else.

        A tensor swapped in for one call (``torch.func.functional_call``, FSDP's
        views) is left alone: the forward multiplies it instead.
        """
        if not isinstance(param, nn.Parameter) or not param.is_leaf:
            return
        # FSDP2 (fully_shard) swaps in DTensor shards and, around a unit's forward, gathered copies.
        if "torch.distributed.tensor" in sys.modules and self._follow_sharding(param):
            return
        old = self._grad_mask
        if old is not None:
            old.remove()
            if self._hooked is not param or old.cdata != param._cdata:
                self.forget_clean()  # the version seen belonged to the previous tensor
            if self._hooked is param and old.cdata != param._cdata:
                # torch.utils.swap_tensors gave this object a new tensor (``_apply`` with
                # torch.__future__.set_swap_module_params_on_conversion): torch's own registration of
                # its hook dicts went with the old tensor, so start new ones.
                param._backward_hooks = None
                param._post_accumulate_grad_hooks = None
        self.__dict__["_hooked"] = param
        self._grad_mask = _GradientMask(self, param)

    def _follow_sharding(self, param: torch.Tensor) -> bool:
        """Shard the mask like a DTensor ``param``; True for FSDP's gathered copy (hook nothing)."""
        return _fsdp().follow_sharding(self, param)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # A gradient stamp is a weak reference to the gradient, which would keep _apply from swapping it.
        if self._grad_mask is not None:
            self._grad_mask.stamp = None
        result = super()._apply(fn, recurse)
        self._adopt(self._parameters["param"])
        return result

    def grad_is_masked(self) -> bool:
        """True if ``param.grad`` is exactly the gradient the hooks masked, under the current mask.

        Anything that touched the gradient since (clipping, AMP unscaling,
        added noise, an assignment) changes its object or version; a mask
        update changes the mask's version.
        """
        stamp = self._grad_mask.stamp if self._grad_mask is not None else None
        grad = self._parameters["param"].grad
        return (stamp is not None and grad is not None and stamp[0]() is grad and grad._version == stamp[1]
                and self._buffers["mask"]._version == stamp[2])

    def _any_pruned(self) -> bool:
        # reading the bool mask as bytes is ~40x faster than Tensor.all() on large masks
        mask = self.mask
        if "_fsdp_sharded" in self.__dict__:
            mask = mask.to_local()  # this rank's shard: the one its re-zeroing and gradient masking touch
        return mask.numel() > 0 and int(mask.view(torch.uint8).amin()) == 0

    def keep(self) -> torch.Tensor:
        """The mask as a multiplier for the per-step path: a cached float copy on CPU, else :meth:`keep_bytes`."""
        param, mask = self._parameters["param"], self._buffers["mask"]
        if not self.float_copy or param.device.type != "cpu" or mask.device != param.device:
            self._keep = self._keep_key = None
            return self.keep_bytes()
        key = (mask._version, mask.data_ptr(), param.dtype, param.device)
        if self._keep is None or self._keep_key != key:
            # Built outside inference mode even when first asked for inside it (validation under
            # torch.inference_mode()): an inference tensor could not be saved for a later backward.
            with torch.inference_mode(False):
                self._keep = mask.view(torch.uint8).to(dtype=param.dtype, device=param.device)
            self._keep_key = key
        return self._keep

    def keep_bytes(self) -> torch.Tensor:
        """The mask as 0/1 bytes (a view of the bool buffer, no copy) on the parameter's device."""
        mask = self._buffers["mask"].view(torch.uint8)
        return mask if mask.device == self._parameters["param"].device else mask.to(self._parameters["param"].device)

    def mark_clean(self) -> None:
        """Declare the stored pruned entries exactly zero without a pass over them.

        Only for callers that proved it (:mod:`fxprune.zero_preserving`).
        """
        # Per weight and step: the instance dict directly, not nn.Module.__setattr__ (~4 us a call).
        self.__dict__["_clean_version"] = self._parameters["param"]._version

    def forget_clean(self) -> None:
        """The stored pruned entries may have changed in a way the version counter does not show."""
        self.__dict__["_clean_version"] = -1

    def is_clean(self) -> bool:
        """True when the stored pruned entries are known to be exactly zero."""
        return self._parameters["param"]._version == self._clean_version

    def apply_mask(self, *, cold: bool = False) -> None:
        """Zero the stored pruned entries, unless nothing touched the tensor since the last time.

        Goes through ``.data`` so that it is allowed between forward and
        backward (the seed calls ``on_minibatch_end`` there) and does not bump
        the version counter that :meth:`is_clean` watches. ``cold``: a
        one-time call (a mask update, a load) that should not build the
        float copy of the mask.
        """
        if not self._has_pruned or self.is_clean():
            return
        param = self._parameters["param"]
        if "torch.distributed.tensor" in sys.modules and _fsdp().is_dtensor(param):
            self._adopt(param)  # FSDP2 may have swapped in a new shard: the mask follows before it is used
        elif "_fsdp_sharded" in self.__dict__:
            return  # FSDP2's gathered copy, taken from shards re-zeroed before the gather
        if cold:
            _zero_pruned(param.data, self.keep_bytes())
        else:
            param.data.mul_(self.keep())
        self.__dict__["_clean_version"] = param._version

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Install a new mask and zero the newly pruned entries."""
        self.mask.copy_(mask)
        self._has_pruned = self._any_pruned()
        self.forget_clean()
        self._adopt(self._parameters["param"])  # a backward may come with no forward since
        self._keep = self._keep_key = None  # a stale float copy would be rebuilt anyway: free it now
        self.apply_mask(cold=True)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Code that reads a module-level-masked weight outside the module's call gets this module instead of
        # a tensor; the usual case is activation checkpointing, whose recomputation in backward re-runs a
        # method (``checkpoint(self.mix, x)`` with ``x @ self.w``) after the leaf's hooks have exited. Torch
        # functions and operators then use the effective weight.
        def effective(a):
            return a() if isinstance(a, MaskedParameter) else a

        args = tuple(effective(a) for a in args)
        kwargs = {k: effective(v) for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)

    # Tensor metadata, for Python forwards that read ``self.layer.weight.dtype`` (e.g. HF ViTModel) while
    # the layer runs a graph of its own: the masked module stands where the parameter was.
    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    @property
    def device(self) -> torch.device:
        return self.param.device

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def folded(self) -> torch.Tensor:
        """The effective weight as a new plain tensor."""
        out = self.param.detach().clone()
        _zero_pruned(out, self.keep_bytes())
        return out

    @torch.no_grad()
    def fold_into_parameter(self) -> nn.Parameter:
        """Zero the pruned entries of the parameter itself and unhook it: the plain weight, with no copy.

        For :func:`fxprune.convert`: the same ``nn.Parameter`` object leaves
        this module (its ``requires_grad`` and identity kept), so folding
        needs no second copy of the weights; this module is unusable after.
        """
        param = self._parameters["param"]
        if self._has_pruned:
            _fill_pruned_with_zeros(param.data, self.keep_bytes())
        if self._grad_mask is not None:
            self._grad_mask.remove()
            self._grad_mask = None
        for hooks in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            if not getattr(param, hooks, None):
                setattr(param, hooks, None)  # only fxprune's hooks were there: leave no empty dict behind
        self.__dict__["_hooked"] = None
        self._keep = self._keep_key = None
        return param

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401 - torch hook
        param = self._parameters["param"]
        if "torch.distributed.tensor" in sys.modules and _fsdp().is_dtensor(param):
            # (FSDP2) a state dict taken before any mask update or forward already has the masks sharded
            # like their parameters, so torch.distributed.checkpoint loads shards into shards.
            self._adopt(param)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(*args, **kwargs)
        self._has_pruned = self._any_pruned()
        self.forget_clean()
        self._adopt(self._parameters["param"])  # assign=True loads put new parameter objects here
        # Re-zero now rather than multiply in the next forward: a forward's graph must not depend on whether
        # a hook ran in between (non-reentrant checkpointing recomputes it and compares).
        self.apply_mask(cold=True)

    def __setstate__(self, state):
        # A copied or unpickled tensor has a fresh version counter: never trust the old one.
        super().__setstate__(state)
        self.forget_clean()
        self._keep = self._keep_key = None
        self._grad_mask = None
        self.__dict__["_hooked"] = None
        self._hook_gradients(self._parameters["param"])
        self.apply_mask(cold=True)  # see _load_from_state_dict

    def __getstate__(self):
        # Hooks belong to this object's parameter; a copy hooks its own (in __setstate__).
        state = self.__dict__.copy()
        state.update(_grad_mask=None, _hooked=None, _keep=None, _keep_key=None, optimizer_watched=0)
        return state

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        n = self.mask.numel()
        return f"shape={tuple(self.param.shape)}, sparsity={1 - kept / max(n, 1):.4f}"


#: Entries per chunk of :func:`_zero_pruned`: 16 MiB of float32 temporaries at most.
_ZERO_CHUNK = 1 << 22


def _fill_pruned_with_zeros(data: torch.Tensor, keep_bytes: torch.Tensor) -> None:
    """Set the pruned entries to ``+0.0`` exactly, in chunks (see :func:`_zero_pruned`).

    For the weights ``convert`` hands back: the multiply used in training
    leaves ``-0.0`` where a pruned weight was negative (and NaN where it was
    NaN or inf), and the user saves, hashes and compares these tensors; plain
    zeros also make a compact checkpoint of them bit-exact.
    """
    keep = keep_bytes.view(torch.bool)
    n = data.numel()
    if n <= _ZERO_CHUNK or keep.shape != data.shape or not (data.is_contiguous() and keep.is_contiguous()):
        data.masked_fill_(torch.logical_not(keep), 0)
        return
    flat, keep = data.view(-1), keep.view(-1)
    for lo in range(0, n, _ZERO_CHUNK):
        flat[lo:lo + _ZERO_CHUNK].masked_fill_(torch.logical_not(keep[lo:lo + _ZERO_CHUNK]), 0)


def _zero_pruned(data: torch.Tensor, keep_bytes: torch.Tensor) -> None:
    """``data *= keep_bytes`` in chunks.

    A CPU multiply by a tensor of another dtype first casts that operand whole
    (a float copy of the mask: as much memory as the weight); chunk by chunk
    that temporary stays small. NaN and inf entries become NaN, as with any
    multiply by 0.
    """
    n = data.numel()
    if n <= _ZERO_CHUNK or type(data) is not torch.Tensor or not (data.is_contiguous() and keep_bytes.is_contiguous()):
        data.mul_(keep_bytes)
        return
    flat, keep = data.view(-1), keep_bytes.view(-1)
    for lo in range(0, n, _ZERO_CHUNK):
        flat[lo:lo + _ZERO_CHUNK].mul_(keep[lo:lo + _ZERO_CHUNK])


def _fsdp():
    # Imported only once a DTensor exists: the FSDP2 support needs torch.distributed.tensor.
    from fxprune import fsdp

    return fsdp


class _GradientMask:
    """The gradient hooks of one masked parameter, holding it weakly (no reference cycle through the tensor).

    ``backward()``: after autograd has accumulated ``param.grad``, it is
    masked in place -- one read-modify-write pass per weight and step, no new
    tensor (an out-of-place mask would allocate a fresh gradient every step,
    which costs as much again on CPU) -- and stamped for
    :meth:`MaskedParameter.grad_is_masked`. The whole accumulated gradient is
    masked, so gradient accumulation and a mask update between forward and
    backward are covered too.

    ``torch.autograd.grad()`` accumulates nothing, so the post-accumulate hook
    does not run; the tensor hook, which runs for both, masks out of place
    only then. It tells the two apart by asking the engine whether the
    parameter's accumulator runs in this pass (which, during
    ``autograd.grad``, the engine answers with an error).

    A parameter that does not require gradients gets no hooks (``handles``
    is empty) until it does.
    """

    __slots__ = ("owner", "cdata", "handles", "stamp")

    def __init__(self, owner: MaskedParameter, param: nn.Parameter):
        self.owner = weakref.ref(owner)
        self.cdata = param._cdata  # which tensor the hooks were registered on (see _hook_gradients)
        self.stamp: tuple | None = None  # (weakref to the gradient, its version, the mask's version)
        self.handles: tuple[RemovableHandle, ...] = ()
        if param.requires_grad:
            self.handles = (param.register_hook(self.before_accumulate),
                            param.register_post_accumulate_grad_hook(self.after_accumulate))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = ()

    def before_accumulate(self, grad: torch.Tensor) -> torch.Tensor | None:
        owner = self.owner()
        if owner is None or not owner._has_pruned:
            return None
        if _accumulates(owner._hooked):
            return None  # backward(): masked in place once accumulated
        return grad * owner.keep()  # autograd.grad(): the result is all there is

    def after_accumulate(self, param: torch.Tensor) -> None:
        owner = self.owner()
        grad = param.grad
        self.stamp = None
        if owner is None or grad is None or not owner._has_pruned:
            return
        if grad.is_sparse:  # nn.Embedding(sparse=True)
            param.grad = grad * owner.keep()
            return
        grad.mul_(owner.keep())
        if not owner.optimizer_watched:
            owner.forget_clean()  # see MaskedParameter.__init__
        if not grad.requires_grad:  # a gradient with a graph (create_graph=True) may change through it
            self.stamp = (weakref.ref(grad), grad._version, owner._buffers["mask"]._version)


#: (graph task id, whether it accumulates into .grad): one answer per backward pass, asked by every
#: masked weight's tensor hook. A memo, not state: task ids are unique, so a stale entry is never reused.
_last_task: tuple[int, bool] = (-1, False)
#: Both engine queries are private torch APIs; without them every gradient is masked by the tensor hook too.
_ENGINE_ANSWERS = hasattr(torch._C, "_current_graph_task_id") and hasattr(torch._C, "_will_engine_execute_node")


def _accumulates(param: torch.Tensor | None) -> bool:
    """Whether the running backward pass accumulates into ``.grad`` (``backward()``), not ``autograd.grad()``.

    Inside ``torch.autograd.grad`` the engine refuses the question for a leaf
    with an error; in ``backward()`` a leaf's hook runs only when its
    accumulator does.
    """
    global _last_task
    if not _ENGINE_ANSWERS or param is None:
        return False  # mask out of place here as well: correct, one more pass
    task = torch._C._current_graph_task_id()
    if _last_task[0] == task:
        return _last_task[1]
    try:
        answer = bool(torch._C._will_engine_execute_node(get_gradient_edge(param).node))
    except RuntimeError:
        answer = False
    _last_task = (task, answer)
    return answer
