import pytest
import torch

from signtrap.errors import SigntrapError
from signtrap.models import create_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_maps_32px_images_to_43_logits(name):
    model = create_model(name).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 43) and torch.isfinite(logits).all()


def test_timm_names_pass_through_and_unknown_names_suggest():
    assert create_model("resnet10t").eval()(torch.rand(1, 3, 32, 32)).shape == (1, 43)
    with pytest.raises(SigntrapError, match="did you mean 'resnet18'"):
        create_model("resnet19")


def test_input_is_pixel_space_with_normalisation_inside():
    model = create_model("signnet")
    assert model.mean.shape == (1, 3, 1, 1) and model.std.shape == (1, 3, 1, 1)
