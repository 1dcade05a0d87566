"""`bench.connection_flood` runs end to end on small numbers (its figures are measured in bench/, not asserted)."""

from __future__ import annotations

import json

import pytest

from bench import connection_flood


@pytest.mark.e2e
def test_flood_bench_reports_every_phase(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--json", "--connections", "60", "--slow", "10", "--max-connections", "20"]
    assert connection_flood.main([*argv, "--header-timeout", "0.5", "--body-timeout", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    for phase in ("half_requests", "slow_headers", "slow_bodies"):
        figures = report[phase]
        assert figures["connections_opened"] == figures["closed_by_server"]
        answered, asked = figures["health_answered"].split("/")
        assert answered == asked and int(asked) > 0
        assert figures["most_connections_held_by_server"] <= 20 and figures["log_bytes_added"] > 0
