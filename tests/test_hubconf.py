"""torch.hub.load(REPO, 'pspnet', name, source='local') fetches, verifies and loads, with no internet."""
from __future__ import annotations

import torch

from helpers import REPO, assert_close_to_scale, tiny_checkpoint_path, tiny_expected


def test_hub_lists_the_entry_points_and_names(hub_manifest):
    names = torch.hub.load(str(REPO), "list_models", source="local", pattern="tiny*", manifest=str(hub_manifest))
    assert names == ["tiny_r50", "tiny_r101"]
    assert len(torch.hub.load(str(REPO), "list_models", source="local", dataset="ade20k")) == 4 + 2  # + the authors'


def test_hub_load_downloads_and_matches_the_reference(hub_server, hub_manifest, monkeypatch):
    monkeypatch.setenv("PSP_ZOO_MANIFEST", str(hub_manifest))
    model = torch.hub.load(str(REPO), "pspnet", "tiny_r50", source="local", quiet=True)
    cached = torch.hub.get_dir() + "/checkpoints/" + tiny_checkpoint_path("r50").name
    assert [r.path for r in hub_server.log] == [hub_server.path_of("r50")]
    assert open(cached, "rb").read() == tiny_checkpoint_path("r50").read_bytes()
    expected = tiny_expected("r50", align_corners=False)
    with torch.no_grad():
        logits = model(expected["whole_input"])
    assert_close_to_scale(logits, expected["whole_logits"], 1e-5)

    again = torch.hub.load(str(REPO), "pspnet", name="tiny_r50", source="local", offline=True)
    assert len(hub_server.log) == 1 and not again.training
    untrained = torch.hub.load(str(REPO), "pspnet", "tiny_r101", source="local", pretrained=False)
    assert len(hub_server.log) == 1 and len(untrained.backbone.layer3) == 23
