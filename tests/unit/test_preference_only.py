"""`personalize.preference_only`: a head-only fit projected onto the CLaP's preference space
(`fit_user.project_heads`) serves the fit's means of those coordinates times the scale and the prior's N(0, 1)
everywhere else; the setting is part of a fit's version only when on."""
from __future__ import annotations

import pytest
import torch

from latentpref.tasks.models.policy import user_latent
from latentpref.tasks.policy.settings import FitSettings
from latentpref.tasks.train.fit_user import project_heads


@pytest.mark.parametrize("dims", [1, 4, 6])
def test_projected_head_keeps_the_preference_coordinates_scaled_and_the_prior_elsewhere(dims):
    torch.manual_seed(0)
    Q, d, D = 4, 5, 8
    weight, bias, features = torch.randn(Q, d, 2 * D // Q), torch.randn(Q, 2 * D // Q), torch.randn(7, Q, d)
    mu, logvar = user_latent(weight, bias, features)
    pw, pb = project_heads(weight, bias, dims, 0.5)
    pmu, plogvar = user_latent(pw, pb, features)
    torch.testing.assert_close(pmu[:, :dims], 0.5 * mu[:, :dims])
    torch.testing.assert_close(plogvar[:, :dims], logvar[:, :dims])
    assert torch.equal(pmu[:, dims:], torch.zeros(7, D - dims))
    assert torch.equal(plogvar[:, dims:], torch.zeros(7, D - dims))
    # stacked users too, and the input is left alone
    sw, sb = project_heads(weight.expand(3, -1, -1, -1), bias.expand(3, -1, -1), dims, 0.5)
    torch.testing.assert_close(sw[2], pw)
    assert not torch.equal(weight, pw)
    with pytest.raises(ValueError, match="project dims"):
        project_heads(weight, bias, D + 1, 0.5)


def test_projection_is_in_a_fits_settings_only_when_on():
    off = FitSettings()
    assert "project_dims" not in off.as_dict()              # older fits keep their versions
    on = FitSettings(project_dims=4, project_scale=0.5)
    assert on.as_dict()["project_dims"] == 4 and on.as_dict() != off.as_dict()
    assert "project_dims" not in on.gaussian() and "project_scale" not in on.gaussian()
    assert FitSettings.of(on.as_dict()) == on                 # the release's payload round-trips (online refits)
    with pytest.raises(ValueError, match="project_dims"):
        FitSettings(project_dims=-1)
