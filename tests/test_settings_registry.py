"""The settings registry: one description of every setting, which every reader and writer goes through."""

from __future__ import annotations

from dataclasses import fields

import pytest
from sqlalchemy import Engine, text

from payments.settings import (
    REGISTRY,
    InvalidSettingError,
    PipelineSettings,
    read_values,
    stored_settings,
    typed_values,
    write_setting,
)
from tasks.monitor import Thresholds, read_thresholds

pytestmark = pytest.mark.db


def test_the_registry_describes_the_pipeline_settings_exactly() -> None:
    pipeline = {s.name: s for s in REGISTRY.values() if s.component == "pipeline"}
    assert set(pipeline) == {f.name for f in fields(PipelineSettings)}
    assert all(pipeline[f.name].default == f.default for f in fields(PipelineSettings))
    assert Thresholds.from_settings({}) == Thresholds()  # the monitor's defaults are the registry's
    for s in REGISTRY.values():
        assert s.low <= s.default <= s.high and s.description, s.name


@pytest.mark.parametrize("raw", ["abc", "nan", "NaN", "inf", "-Infinity", "0x10", "1e3", "1_000", "", " ", "١٠",
                                 "10" * 30, "5; DROP TABLE payment_queue"])
def test_values_a_setting_cannot_take_are_named_with_their_range(raw: str) -> None:
    for name in ("alert_sent_age_seconds", "alert_confirmation_rate_min", "payment_batch_size",
                 "webhook_max_attempts", "monitor_window_minutes"):
        with pytest.raises(InvalidSettingError, match=name) as bad:
            REGISTRY[name].parse(raw)
        assert bad.value.setting is REGISTRY[name]


def test_a_migrated_database_holds_every_setting_at_its_default(engine: Engine) -> None:
    with engine.connect() as conn:
        stored = stored_settings(conn)
        assert set(REGISTRY) <= set(stored)
        assert typed_values(stored) == {s.name: s.default for s in REGISTRY.values()}


def test_writes_are_checked_and_a_bad_stored_value_is_named_when_read(engine: Engine) -> None:
    with engine.begin() as conn:
        assert write_setting(conn, "alert_confirmation_rate_min", "0.5") == 0.5
        assert write_setting(conn, "alert_reminder_seconds", 0) == 0
        for name, value in (("alert_confirmation_rate_min", "1.5"), ("monitor_window_minutes", "nan"),
                            ("alert_stuck_seconds", "0x10"), ("no_such_setting", "1")):
            with pytest.raises(InvalidSettingError, match=name):
                write_setting(conn, name, value)
    with engine.connect() as conn:
        assert read_thresholds(conn).confirmation_rate_min == 0.5
        assert read_values(conn, "webhooks") == {"webhook_max_attempts": 8, "webhook_backoff_seconds": 5}
    with engine.begin() as conn:  # written around the registry, straight into the table
        conn.execute(text("UPDATE system_settings SET value = 'abc' WHERE key = 'alert_stuck_seconds'"))
    with engine.connect() as conn, pytest.raises(InvalidSettingError, match="alert_stuck_seconds"):
        read_thresholds(conn)
