"""What a command feeds an encoder it loaded (mlcd_jax/interop/weights.py): the image side is the
model's own unless asked, and a size a CLIP-style model cannot take is refused with advice that
fits it."""

import pytest
from flax import nnx

from mlcd_jax.interop import weights
from mlcd_jax.models import vit
from mlcd_jax.runtime.errors import UserError


def test_image_side_defaults_to_the_models_own_and_refuses_what_a_learned_table_cannot_take():
    clip = vit.ViT(vit.vit_config("micro", pos="learned", image_size=32), rngs=nnx.Rngs(0))
    rope = vit.ViT(vit.vit_config("micro", image_size=32), rngs=nnx.Rngs(0))
    assert weights.image_side("teacher", clip) == 32       # not a default of 224
    assert weights.image_side("teacher", clip, 32) == 32
    assert weights.image_side("student", rope) == 32
    assert weights.image_side("student", rope, 224) == 224  # RoPE takes any size
    with pytest.raises(UserError) as e:
        weights.image_side("teacher", clip, 224)
    message = str(e.value)
    # The advice for a CLIP teacher: its size, and to leave the flag out (not "use pos='rope'",
    # which a user cannot change about a downloaded checkpoint).
    assert "--image_size 224" in message and "32×32" in message
    assert "leave --image_size out" in message and "rope" not in message
