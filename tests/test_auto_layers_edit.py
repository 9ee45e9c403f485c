from __future__ import annotations

import pytest
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit import KeditError, bundled_requests, choose_edit_layers, compute_edit
from lightning_kedit.editing.edit_inputs import auto_edit_layers


def test_layers_auto_edits_where_tracing_points(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    model, tokenizer = tiny_model("llama", num_layers=4), tiny_tokenizer()
    requests = bundled_requests()[:2]
    chosen = choose_edit_layers(model, tokenizer, requests, window=1)
    assert auto_edit_layers(model, tokenizer, requests, "ft") == chosen
    delta = compute_edit(model, tokenizer, requests, method="ft", layers="auto")
    assert delta.layers == chosen


def test_layers_spec_other_than_auto_is_refused(llama, tokenizer) -> None:
    with pytest.raises(KeditError, match="neither a list of layer indices nor 'auto'"):
        compute_edit(llama, tokenizer, bundled_requests()[:1], method="ft", layers="best")
