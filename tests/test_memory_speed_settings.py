"""bench/memory_speed.py's per-step settings: chunk size, the released sampling copy, the shared-prompt passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from memory_speed import Setting, parse_chunk_sizes, setting_name, summarize  # noqa: E402


def test_suffixes_set_release_and_shared_in_any_order():
    assert parse_chunk_sizes("none,256+release,256+shared+release, 1024+shared") == [
        Setting(None),
        Setting(256, release=True),
        Setting(256, release=True, shared=True),
        Setting(1024, shared=True),
    ]


@pytest.mark.parametrize("text", ["256+fast", "0", "256+", "many"])
def test_a_bad_entry_names_the_option(text):
    with pytest.raises(SystemExit, match="--chunk-sizes"):
        parse_chunk_sizes(text)


def test_names_round_trip_and_keep_shared_and_plain_steps_apart():
    settings = parse_chunk_sizes("256+release+shared,256+release")
    assert [setting_name(s) for s in settings] == ["256+release+shared", "256+release"]
    assert parse_chunk_sizes(",".join(setting_name(s) for s in settings)) == settings

    def row(name, seconds, warm_up=False):
        peak = {"loss_passes": {"allocated_gib": seconds / 2}}
        return {"warm_up": warm_up, "setting": name, "step_seconds": seconds, "phases": {}, "peak": peak}

    rows = [row("None", 50.0, warm_up=True), row("256+release+shared", 16.0), row("256+release", 18.0)]
    rows.append(row("256+release+shared", 17.0))
    summary = summarize(rows, settings)
    assert summary["256+release+shared"]["steps"] == 2
    assert summary["256+release+shared"]["step_seconds"] == pytest.approx(16.5)
    assert summary["256+release+shared"]["peak_loss_passes_allocated_gib"] == pytest.approx(8.5)
    assert summary["256+release"]["step_seconds"] == pytest.approx(18.0)
