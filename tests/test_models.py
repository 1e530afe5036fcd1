import pytest
import torch
import torch.nn.functional as F

from signtrap.runs import checkpoint
from signtrap.errors import SigntrapError
from signtrap.datasets.gtsrb import LABELS
from signtrap.models import create_model, list_models

MEAN, STD = LABELS.mean, LABELS.std


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_maps_32px_images_to_43_logits_and_learns(name):
    torch.manual_seed(0)
    model = create_model(name, 43).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 43) and torch.isfinite(logits).all()
    # a few optimiser steps on one fixed batch must lower its loss: gradients reach the weights and the
    # model can fit (a model whose output ignored its input, or whose weights were frozen, would fail here)
    model.train()
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 43
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert F.cross_entropy(model(x), y).item() < 0.8 * first


def test_timm_names_pass_through_and_unknown_names_suggest():
    assert create_model("resnet10t", 43).eval()(torch.rand(1, 3, 32, 32)).shape == (1, 43)
    with pytest.raises(SigntrapError, match="did you mean 'resnet18'"):
        create_model("resnet19", 43)


def test_input_is_pixel_space_with_normalisation_inside():
    torch.manual_seed(0)
    model = create_model("signnet", 43, dropout=0.0, mean=MEAN, std=STD).eval()
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(MEAN))
    torch.testing.assert_close(model.std.flatten(), torch.tensor(STD))
    x = torch.rand(4, 3, 32, 32)  # pixels / 255, as the exporter and the edge script feed it
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone((x - mean) / std))
        # the mean image is the backbone's zero input: normalisation really happens inside the model
        torch.testing.assert_close(model(mean.expand(1, 3, 32, 32)), model.backbone(torch.zeros(1, 3, 32, 32)))
        assert not torch.allclose(model(x), model.backbone(x))


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = create_model("signnet_small", 43).eval()
    meta = {"model_name": "signnet_small", "num_classes": 43, "dropout": 0.1}
    checkpoint.save(tmp_path / "model.pt", checkpoint.model_payload(model, meta))
    checkpoint.record_checksum(tmp_path, "model.pt")
    again, loaded_meta = checkpoint.verified_load(tmp_path, "model.pt")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert loaded_meta == meta
