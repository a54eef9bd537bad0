"""The run waits longer for a larger fleet to come online: a fixed 60 s failed 899 of 1000 devices."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from testbed.runner import ONLINE_TIMEOUT_S, online_timeout_s


def test_small_fleets_keep_the_60_s_and_a_thousand_devices_get_150_s() -> None:
    assert online_timeout_s(1) == online_timeout_s(100) == ONLINE_TIMEOUT_S == 60.0
    assert online_timeout_s(1000) == 150.0


@given(st.integers(0, 100_000))
def test_the_timeout_grows_with_the_fleet(devices: int) -> None:
    assert ONLINE_TIMEOUT_S <= online_timeout_s(devices) <= online_timeout_s(devices + 1)
