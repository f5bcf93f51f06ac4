"""Fixtures of the fault tests: real services (tests/services.py), shared by tests/faults and tests/integration."""
from services import (  # noqa: F401  (pytest finds fixtures and hooks by name in this module)
    _stop_services_after_their_last_test,
    live_services,
    night,
    pytest_collection_modifyitems,
)
