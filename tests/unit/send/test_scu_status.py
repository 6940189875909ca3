"""Which C-STORE answers count as stored."""

from __future__ import annotations

import pytest

from dicomnode.send.scu import is_warning


@pytest.mark.parametrize("code", [0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007, 0xB123])
def test_warnings_mean_stored(code: int) -> None:
    assert is_warning(code)


@pytest.mark.parametrize("code", [0x0000, 0xA700, 0xA900, 0xC000, 0x0110, 0x0122, 0x0211])
def test_success_and_failures_are_not_warnings(code: int) -> None:
    assert not is_warning(code)


def test_an_unknown_host_is_a_retryable_one_line_error() -> None:
    from dicomnode.config import Destination
    from dicomnode.errors import TransientJobError
    from dicomnode.send import echo

    nowhere = Destination(
        name="pacs", ae_title="PACS", host="no-such-host.invalid", port=104, timeout_seconds=2
    )
    with pytest.raises(TransientJobError) as info:
        echo(nowhere, "DICOMNODE")
    assert str(info.value).startswith("destination pacs: cannot connect to no-such-host.invalid")
    assert info.value.retryable and "\n" not in str(info.value)
