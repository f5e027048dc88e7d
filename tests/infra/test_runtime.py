"""The run-time environment: workers of a cluster gsafe did not start are checked for the Prefect API."""

from __future__ import annotations

import os

from infra.runtime import worker_api_problems


def test_workers_with_another_prefect_api_are_named(monkeypatch):
    from distributed import Client, LocalCluster

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert worker_api_problems(client, os.environ["PREFECT_API_URL"]) == []
        problems = worker_api_problems(client, "http://127.0.0.1:9999/api")
    assert len(problems) == 1
    assert "PREFECT_API_URL=http://127.0.0.1:4200/api" in problems[0] and "start the workers with" in problems[0]
    assert worker_api_problems(None, "http://x/api") == [] and worker_api_problems(object(), None) == []
