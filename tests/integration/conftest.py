"""Fixtures of the distributed integration test: real services shared with tests/faults (tests/services.py)."""
import pytest

import services


@pytest.fixture(scope="session")
def live_services():
    """moto S3 + MLflow server + 2-node Ray cluster, started once per session (by the first test needing
    them, here or in the other directory), stopped by PID right after the last such test."""
    svc = services.shared()
    yield svc
    services.release()


@pytest.fixture(scope="session")
def night(live_services):
    """The full nightly flow (tiny preset, smaller still) on s3:// + Ray cluster + MLflow server."""
    return services.base_night(live_services)


@pytest.hookimpl(trylast=True)   # after -k / -m deselection: only tests that will run are counted
def pytest_collection_modifyitems(items):
    services.expect_users([i.nodeid for i in items if "live_services" in getattr(i, "fixturenames", ())])


@pytest.fixture(autouse=True)
def _stop_services_after_their_last_test(request):
    yield
    services.test_finished(request.node.nodeid)
