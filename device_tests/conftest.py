"""Run on the target: ``pytest device_tests --bundle /path/to/bundle [--target rpi4]
[--backends numpy,tvm,onnxruntime]`` (``edgecl device-test --to ssh://...`` does this on
the device and brings the results back).

``--backends`` names the backends that must run (a missing one fails); without it every
backend usable on this device is checked and the others are skipped with the reason.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bundle", action="store", help="the bundle deployed on this device")
    parser.addoption("--target", action="store", help="target profile (rpi4, rpi5, jetson-orin, host)")
    parser.addoption("--backends", action="store",
                     help="backends that must pass (default: every one usable here)")
    parser.addoption("--learn-ram-mb", action="store", type=float, default=128.0,
                     help="RAM budget of the on-device learning test (default 128)")


@pytest.fixture(scope="session")
def bundle_path(request: pytest.FixtureRequest) -> str:
    path = request.config.getoption("--bundle")
    if not path:
        pytest.fail("device_tests need --bundle PATH (the bundle deployed on this device)")
    return path


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> str | None:
    from edgecl.runtime import profiles

    name = request.config.getoption("--target")
    return name or profiles.identify(profiles.detect())


@pytest.fixture(scope="session")
def required_backends(request: pytest.FixtureRequest) -> list[str] | None:
    value = request.config.getoption("--backends")
    return None if not value else [b for b in value.split(",") if b]
