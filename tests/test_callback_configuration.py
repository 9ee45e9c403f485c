"""The callback's one configuration error type, and ``should_edit`` with the moment as an argument."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_kedit.errors import KeditError
from lightning_kedit.lightning import KnowledgeEditCallback
from lightning_kedit.lightning.configuration_error import KeditConfigurationError
from lightning_kedit.lightning.strategies import check_strategy
from lightning_kedit.requests import bundled_requests


class _NewStyle(KnowledgeEditCallback):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[str, object]] = []

    def should_edit(self, trainer, pl_module, moment=None) -> bool:
        self.asked.append((moment, self.moment))
        return False


class _OldStyle(KnowledgeEditCallback):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[object] = []

    def should_edit(self, trainer, pl_module) -> bool:
        self.asked.append(self.moment)
        return False


def _trainer() -> SimpleNamespace:
    return SimpleNamespace(global_step=0, current_epoch=0)


@pytest.mark.parametrize(
    "kwargs",
    [{"method": "nope"}, {"edit_at": "never"}, {"metrics": ["nope"]}, {"on_damage": "nope"}, {"edit_as": "nope"},
     {"ppl_text": "/no/such/file.txt"}, {"statistics": "predict", "edit_at": "predict_start"}],
)
def test_init_raises_one_configuration_error_caught_as_both(kwargs) -> None:
    with pytest.raises(KeditConfigurationError) as caught:
        KnowledgeEditCallback(bundled_requests(), **kwargs)
    assert isinstance(caught.value, KeditError) and isinstance(caught.value, MisconfigurationException)


def test_setup_strategy_error_is_the_same_type() -> None:
    class DeepSpeedStrategy:  # only the name is read
        pass

    with pytest.raises(KeditConfigurationError, match="DeepSpeed"):
        check_strategy(DeepSpeedStrategy())  # type: ignore[arg-type]


def test_should_edit_gets_the_moment_as_an_argument() -> None:
    callback = _NewStyle(bundled_requests(), edit_at="fit_end")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        callback._maybe_edit(_trainer(), None, "fit_end")  # type: ignore[arg-type]
    assert callback.asked == [("fit_end", "fit_end")]
    assert callback.moment is None
    plain = KnowledgeEditCallback(bundled_requests(), edit_at="fit_end")
    assert plain.should_edit(_trainer(), None, "fit_end") and not plain.should_edit(_trainer(), None, "step")


def test_should_edit_with_the_old_signature_still_works_with_a_deprecation_warning() -> None:
    callback = _OldStyle(bundled_requests(), edit_at="fit_end")
    with pytest.warns(DeprecationWarning, match="moment"):
        callback._maybe_edit(_trainer(), None, "epoch_end")  # type: ignore[arg-type]
    assert callback.asked == ["epoch_end"]
    assert callback.moment is None
