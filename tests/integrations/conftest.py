"""Fixtures of the integration tests."""

import pytest
from _helpers import reset_accelerate_state


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's state is process-global: an Accelerator created by another test in this
    process (an HF Trainer's, say) would hand its settings on, e.g. the bf16 mixed precision of
    SFTConfig's default. Each test starts and ends without one."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()
