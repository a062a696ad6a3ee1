"""Sparsity report: per parameter by original name, overall, printable; prepared and converted agree."""
from __future__ import annotations

import torch
from hypothesis import given, settings

import fxprune
from generated import build, config_for, model_specs


@settings(max_examples=20, deadline=None)
@given(spec=model_specs)
def test_report_counts_match_tensors_on_prepared_and_converted(spec):
    model, _ = build(spec)
    prepared = fxprune.prepare(model, config_for({"start_epoch": 0, "end_epoch": 0, "target_sparsity": 0.6}))
    prepared.pruner.on_epoch_begin(0)
    report = fxprune.sparsity_report(prepared)
    converted = fxprune.convert(prepared)
    plain = fxprune.sparsity_report(converted)
    # tied parameters appear once, under their first name, in both reports
    assert [r.name for r in report.rows] == [n for n, _ in model.named_parameters()]
    assert [r.name for r in plain.rows] == [r.name for r in report.rows]
    params = dict(converted.named_parameters())
    targets = {t.name for t in prepared.pruner.targets}
    for r in report.rows:
        w = params[r.name]
        assert r.shape == tuple(w.shape) and r.numel == w.numel()
        assert r.zeros == int((w == 0).sum()) == plain[r.name].zeros
        assert r.pruned == (r.name in targets) == plain[r.name].pruned  # convert's record says which
        assert abs(r.sparsity - r.zeros / r.numel) < 1e-12
    assert report.numel == sum(p.numel() for p in params.values())
    assert report.zeros == sum(int((p == 0).sum()) for p in params.values())
    pruned_numel = sum(r.numel for r in report.rows if r.pruned)
    assert abs(report.pruned_sparsity - sum(r.zeros for r in report.rows if r.pruned) / pruned_numel) < 1e-12
    assert plain.pruned_sparsity == report.pruned_sparsity
    assert len(report) == len(report.rows) and list(report) == list(report.rows)
    first = report.rows[0]
    assert first.name in report and "no.such.weight" not in report
    assert report[first.name]["sparsity"] == first.sparsity and report[first.name]["zeros"] == first.zeros
    assert (report.overall.numel, report.overall.zeros, report.overall.sparsity) == (
        report.numel, report.zeros, report.sparsity)
    table = str(report)  # the pruned weights and the totals
    assert all((f"\n{r.name} " in table) == bool(r.pruned) for r in report.rows), table
    assert "TOTAL (pruned weights)" in table and f"{report.sparsity:.4f}" in table
    assert str(plain) == table
    everything = str(fxprune.sparsity_report(prepared, all_parameters=True))
    assert all(f"\n{r.name} " in everything for r in report.rows)


@settings(max_examples=5, deadline=None)
@given(spec=model_specs)
def test_report_of_unpruned_model_is_dense(spec):
    model, _ = build(spec)
    report = fxprune.sparsity_report(model)
    assert report.numel == sum(p.numel() for p in model.parameters())
    assert report.zeros == sum(int((p == 0).sum()) for p in model.parameters())
    assert isinstance(report.to_dict(), dict) and torch.is_tensor(next(model.parameters()))
