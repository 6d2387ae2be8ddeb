"""Every registered family passes the same checks at a tiny size (see family_checks.py).

A new family adds one line to TINY; the test below fails until it does.
"""

import pytest

from voxgen.models.registry import MODELS, names_of

from . import test_dit, test_hdit, test_unet, test_uvit, test_video_unet, test_wdm
from .family_checks import (
    check_attention_kinds_agree,
    check_channels,
    check_grad_checkpointing,
    check_trains_and_samples,
    check_vector_conditioning,
)

TINY = {
    "unet": ["model.name=unet", *test_unet.TINY],
    "dit": test_dit.TINY,
    "sit": [*test_dit.TINY, "model.name=sit"],
    "hdit": test_hdit.TINY,
    "uvit": test_uvit.TINY,
    "wdm": test_wdm.TINY,
    "video_unet": test_video_unet.TINY,
}


def test_every_registered_denoiser_is_checked():
    # Regression families (xray2ct) have their own tests: they take no time and make another shape.
    assert set(TINY) == set(names_of("denoiser")) and set(MODELS) - set(TINY) == set(names_of("regression"))


@pytest.mark.parametrize("family", sorted(TINY))
def test_trains_20_steps_and_samples(family):
    check_trains_and_samples(TINY[family])


@pytest.mark.parametrize("family", sorted(TINY))
def test_grad_checkpointing_same_loss_and_gradients(family):
    check_grad_checkpointing(TINY[family])


@pytest.mark.parametrize("family", sorted(TINY))
def test_a_condition_vector_is_ignored_at_init_and_used_after(family):
    check_vector_conditioning(TINY[family])


@pytest.mark.parametrize("family", sorted(TINY))
def test_sdpa_and_naive_attention_agree(family):
    check_attention_kinds_agree(TINY[family])


@pytest.mark.parametrize("family", sorted(TINY))
def test_one_to_sixteen_input_channels(family):
    check_channels(TINY[family])
