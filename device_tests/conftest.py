"""Run on the target: ``pytest device_tests --bundle /path/to/bundle``."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bundle", action="store", help="the bundle deployed on this device")


@pytest.fixture(scope="session")
def bundle_path(request: pytest.FixtureRequest) -> str:
    path = request.config.getoption("--bundle")
    if not path:
        pytest.fail("device_tests need --bundle PATH (the bundle deployed on this device)")
    return path
