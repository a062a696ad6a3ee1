"""Gradients of pruned entries are 0, and kept entries get the gradient of the effective weight.

The forward of a clean masked weight is the parameter itself; its gradient is
masked by hooks (in place after accumulation for ``backward()``, out of place
for ``torch.autograd.grad``). These properties drive generated models through
every way a user computes gradients and compare with the reference: the
gradient of the converted (plain) model, masked.
"""
from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from generated import MLPSpec, build, config_for, model_specs

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HALF = {"start_epoch": 0, "end_epoch": 0, "init_sparsity": 0.5, "target_sparsity": 0.5}
WAYS = ("backward", "autograd.grad", "accumulate", "keep_grad", "create_graph", "deepcopy", "pickle",
        "functional_call", "refrozen", "new_parameter", "dirty_weight")


def pruned(spec, schedule=HALF):
    model, x = build(spec)
    prepared = fxprune.prepare(model, config_for(schedule))
    prepared.pruner.on_epoch_begin(0)
    return prepared, x


def loss_of(model, x):
    return model(x).pow(2).mean()


def reference_grads(prepared, x, times: int = 1) -> dict[str, torch.Tensor]:
    """d loss / d effective weight on the converted model, masked: what the prepared model must give."""
    plain = fxprune.convert(prepared)
    plain.train(prepared.training)
    params = dict(plain.named_parameters(remove_duplicate=False))
    for _ in range(times):
        loss_of(plain, x).backward()
    return {t.name: params[t.name].grad * t.masked.mask for t in prepared.pruner.targets}


def check(prepared, grads: dict[str, torch.Tensor | None], expected: dict[str, torch.Tensor]) -> None:
    for t in prepared.pruner.targets:
        g = grads[t.name]
        assert g is not None, t.name
        assert bool((g[~t.masked.mask] == 0).all()), f"{t.name}: pruned entries got a gradient"
        torch.testing.assert_close(g.detach(), expected[t.name], rtol=1e-5, atol=1e-6, msg=t.name)


def grads_by(prepared, x, way: str) -> tuple[nn.Module, dict[str, torch.Tensor | None]]:
    """Compute gradients the way a user would; returns the model they belong to and them by name."""
    model = prepared
    if way == "deepcopy":
        model = copy.deepcopy(prepared)
    elif way == "pickle":
        model = pickle.loads(pickle.dumps(prepared))
    elif way == "refrozen":  # frozen, then trained again
        for t in model.pruner.targets:
            t.masked.param.requires_grad_(False)
        loss_of(model, x)
        for t in model.pruner.targets:
            t.masked.param.requires_grad_(True)
    elif way == "new_parameter":  # a user swaps in a new tensor object, nonzero at pruned entries
        for t in model.pruner.targets:
            t.masked.param = nn.Parameter(t.masked.param.detach() + 1.0)
    elif way == "dirty_weight":  # stored pruned entries moved (a step without hooks): the forward multiplies
        with torch.no_grad():
            for t in model.pruner.targets:
                t.masked.param.add_(1.0)
    targets = model.pruner.targets
    params = [t.masked.param for t in targets]
    if way == "autograd.grad":
        return model, dict(zip([t.name for t in targets], torch.autograd.grad(loss_of(model, x), params)))
    if way == "functional_call":
        swapped = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
        # tie_weights=False: a tied weight's masked module sits under two paths, and functional_call's
        # re-tying does not restore a module shared that way (pytorch/pytorch#164759); README says so.
        loss = torch.func.functional_call(model, swapped, (x,), tie_weights=False).pow(2).mean()
        names = {id(p): name for name, p in model.named_parameters()}
        grads = torch.autograd.grad(loss, [swapped[names[id(p)]] for p in params])
        assert all(t.masked.param is p for t, p in zip(targets, params)), "functional_call did not restore"
        return model, dict(zip([t.name for t in targets], grads))
    if way == "keep_grad":
        loss_of(model, x).backward()
        for p in params:
            p.grad.zero_()
    if way == "create_graph":
        loss_of(model, x).backward(create_graph=True)
        grads = {t.name: t.masked.param.grad for t in targets}
        for p in params:
            p.grad = None  # break the parameter <-> gradient cycle create_graph makes
        return model, grads
    loss_of(model, x).backward()
    if way == "accumulate":
        loss_of(model, x).backward()
    return model, {t.name: t.masked.param.grad for t in targets}


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("way", WAYS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=model_specs)
def test_gradients_are_masked_whichever_way_they_are_taken(spec, way):
    prepared, x = pruned(spec)
    model, grads = grads_by(prepared, x, way)
    expected = reference_grads(model, x, times=2 if way == "accumulate" else 1)
    check(model, grads, expected)


@SETTINGS
@given(spec=model_specs)
def test_a_mask_update_between_forward_and_backward_masks_by_the_new_mask(spec):
    prepared, x = pruned(spec, {"start_epoch": 0, "end_epoch": 1, "init_sparsity": 0.3, "target_sparsity": 0.7})
    loss = loss_of(prepared, x)
    old = {t.name: t.masked.mask.clone() for t in prepared.pruner.targets}
    prepared.pruner.on_epoch_begin(1)  # prunes more before the backward
    loss.backward()
    for t in prepared.pruner.targets:
        assert bool((t.masked.param.grad[~t.masked.mask] == 0).all()), t.name
        assert bool((old[t.name] >= t.masked.mask).all())


def test_sparse_embedding_gradients_are_masked():
    model = nn.Sequential(nn.Embedding(20, 6, sparse=True), nn.Linear(6, 3))
    prepared = fxprune.prepare(model, {"magnitude": {"p": {"weights": ["0.weight"]}}, **HALF})
    prepared.pruner.on_epoch_begin(0)
    prepared(torch.tensor([[1, 2, 3, 2]])).sum().backward()
    t = prepared.pruner.targets[0]
    grad = t.masked.param.grad
    assert grad.is_sparse
    dense = grad.to_dense()
    assert bool((dense[~t.masked.mask] == 0).all())
    assert bool((dense[t.masked.mask] != 0).any())


def test_the_hooks_do_not_keep_a_prepared_model_alive():
    prepared, x = pruned(MLPSpec(widths=(6, 6, 4), kinds=("module", "functional"), seed=0))
    loss_of(prepared, x).backward()
    refs = [weakref.ref(prepared)] + [weakref.ref(t.masked) for t in prepared.pruner.targets]
    del prepared
    gc.collect()
    assert all(r() is None for r in refs)


def test_only_the_weights_own_backward_is_touched():
    """backward(inputs=...) that excludes the weights leaves their gradients alone."""
    prepared, x = pruned(MLPSpec(widths=(6, 6, 4), kinds=("module", "module"), seed=1))
    x = x.clone().requires_grad_()
    loss_of(prepared, x).backward(inputs=[x])
    assert all(t.masked.param.grad is None for t in prepared.pruner.targets)
    assert x.grad is not None


@pytest.mark.parametrize("way", ["backward", "autograd.grad"])
def test_an_unpruned_weight_gets_its_full_gradient(way):
    """Before pruning starts the hooks change nothing (the mask is all ones)."""
    spec = MLPSpec(widths=(6, 5, 4), kinds=("module", "transposed"), seed=2)
    prepared, x = pruned(spec, {"start_epoch": 3, "end_epoch": 4, "target_sparsity": 0.5})
    assert all(bool(t.masked.mask.all()) for t in prepared.pruner.targets)
    _, grads = grads_by(prepared, x, way)
    check(prepared, grads, reference_grads(prepared, x))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=model_specs, ways=st.lists(st.sampled_from(["backward", "autograd.grad", "accumulate"]), min_size=2,
                                       max_size=6))
def test_backward_and_autograd_grad_interleaved(spec, ways):
    """Each pass is told apart on its own (the hooks' answer is per backward pass)."""
    prepared, x = pruned(spec)
    for way in ways:
        for t in prepared.pruner.targets:
            t.masked.param.grad = None
        _, grads = grads_by(prepared, x, way)
        check(prepared, grads, reference_grads(prepared, x, times=2 if way == "accumulate" else 1))


def test_converted_model_has_plain_parameters_without_hooks():
    prepared, x = pruned(MLPSpec(widths=(6, 6, 4), kinds=("module", "functional"), seed=3))
    loss_of(prepared, x).backward()
    plain = fxprune.convert(prepared)
    for name, p in plain.named_parameters():
        assert not p._backward_hooks and not getattr(p, "_post_accumulate_grad_hooks", None), name
    loss_of(plain, x).backward()
    # a converted model trains like any model: pruned (zero) weights get their gradient again
    assert any(bool((p.grad[p == 0] != 0).any()) for p in plain.parameters() if p.dim() >= 2)


@pytest.mark.parametrize("swap", [False, True])
def test_dtype_conversion_mid_training_keeps_gradients_masked(swap):
    """``.double()`` between steps, also with torch's swap_tensors conversion (which gives the parameter object a
    new tensor: hooks registered on the old one would no longer fire)."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        prepared, x = pruned(MLPSpec(widths=(6, 6, 4), kinds=("module", "functional"), seed=4))
        opt = torch.optim.SGD(prepared.parameters(), lr=0.1, momentum=0.9)
        prepared.pruner.attach(opt)
        loss_of(prepared, x).backward()
        opt.step()  # gradients and their stamps exist while converting
        prepared.double()
        x = x.double()
        for _ in range(2):
            opt.zero_grad()
            loss_of(prepared, x).backward()
            for t in prepared.pruner.targets:
                assert t.masked.param.dtype == torch.float64
                assert bool((t.masked.param.grad[~t.masked.mask] == 0).all()), t.name
            opt.step()
            for t in prepared.pruner.targets:
                assert bool((t.masked.param.detach()[~t.masked.mask] == 0).all()), t.name
        grads = torch.autograd.grad(loss_of(prepared, x), [t.masked.param for t in prepared.pruner.targets])
        for g, t in zip(grads, prepared.pruner.targets):
            assert bool((g[~t.masked.mask] == 0).all()), t.name
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def test_training_after_validation_under_inference_mode():
    """The cached float mask first built inside torch.inference_mode() must still be usable for training."""
    prepared, x = pruned(MLPSpec(widths=(6, 6, 4), kinds=("module", "functional"), seed=5))
    prepared.load_state_dict(prepared.state_dict())  # a resume: masks and weights loaded anew
    for t in prepared.pruner.targets:
        t.masked.forget_clean()  # as after an edit the version counter does not show: the forward multiplies
    with torch.inference_mode():
        prepared.eval()
        prepared(x)
        prepared.train()
    loss_of(prepared, x).backward()
    check(prepared, {t.name: t.masked.param.grad for t in prepared.pruner.targets}, reference_grads(prepared, x))


def test_functional_call_with_another_models_parameters_leaves_the_hooks_alone():
    """An EMA/teacher forward through functional_call (nn.Parameter values) between forward and backward."""
    prepared, x = pruned(MLPSpec(widths=(6, 6, 4), kinds=("module", "module"), seed=6))
    ema = {name: nn.Parameter(p.detach().clone()) for name, p in prepared.named_parameters()}
    loss = loss_of(prepared, x)
    with torch.no_grad():
        torch.func.functional_call(prepared, ema, (x,))
    loss.backward()
    check(prepared, {t.name: t.masked.param.grad for t in prepared.pruner.targets}, reference_grads(prepared, x))
    assert all(t.masked._hooked is t.masked.param for t in prepared.pruner.targets)
