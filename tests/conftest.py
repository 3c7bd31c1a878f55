"""Suite-wide guards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _autograd_stays_on():
    """Fail a test that leaves autograd switched off: later tests in the process would then fail to backprop."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left torch autograd disabled (use `with torch.no_grad():`, not set_grad_enabled)")
