"""Signal propagation (De & Smith 2020 Fig. 4, arXiv 2002.10444; Brock et al. 2021, arXiv
2101.08692)."""

import numpy as np
import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab.diagnostics import channel_stats


def test_linear_batchnorm_resnet_skip_variance_grows_as_depth():
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=50, width=128, activation="linear", scheme="batchnorm")
    df = dl.signal_propagation(model, torch.randn(256, 64))
    assert list(df["block"]) == list(range(50))
    i = df["block"].to_numpy() + 1
    slope = np.polyfit(i, df["skip_var"].to_numpy(), 1)[0]
    assert 0.8 <= slope <= 1.2
    assert df["branch_var"].mean() == pytest.approx(1.0, abs=0.1)
    # BN input batch variance is the skip variance; running stats of a fresh model are 0 / 1
    np.testing.assert_allclose(df["bn_batch_var"], df["in_var"], rtol=1e-9)
    np.testing.assert_allclose(df["bn_running_var"], 1.0)
    np.testing.assert_allclose(df["out_var"], df["skip_var"] + df["branch_var"], rtol=0.25)


@pytest.mark.parametrize("scheme", ["rezero", "skipinit"])
def test_gated_schemes_are_identity_at_init(scheme):
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=12, width=32, scheme=scheme)
    df = dl.signal_propagation(model, torch.randn(64, 64))
    np.testing.assert_allclose(df["out_var"], df["in_var"], rtol=1e-12)
    np.testing.assert_allclose(df["out_var"], df["out_var"].iloc[0], rtol=1e-12)
    assert (df["gated_var"] == 0).all() and (df["branch_var"] > 0).all()
    assert df["bn_running_var"].isna().all()


def test_channel_reductions_match_hand_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 6, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 1
    per_c = x.permute(1, 0, 2, 3).reshape(3, -1).double()
    var, mean_sq = channel_stats(x)
    assert var == pytest.approx(float(per_c.var(1, unbiased=False).mean()), rel=1e-12)
    assert mean_sq == pytest.approx(float((per_c.mean(1) ** 2).mean()), rel=1e-12)
    t = torch.randn(4, 7, 5, generator=g)  # (N, T, C): per feature over batch and tokens
    flat = t.reshape(-1, 5).double()
    assert channel_stats(t)[0] == pytest.approx(float(flat.var(0, unbiased=False).mean()))


def test_conv_resnet_values_and_no_side_effects():
    torch.manual_seed(0)
    model = dl.create_model("resnet", depth=8, scheme="batchnorm", in_channels=3)
    x = torch.randn(8, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = dl.signal_propagation(model, x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    # hand check of block 0: its input is the stem output
    with torch.no_grad():
        h = model.stem(x)
        out = model.blocks[0](h)
    assert df["in_var"].iloc[0] == pytest.approx(channel_stats(h)[0], rel=1e-6)
    assert df["out_var"].iloc[0] == pytest.approx(channel_stats(out)[0], rel=1e-5)
    assert df["out_mean_sq"].iloc[0] == pytest.approx(channel_stats(out)[1], rel=1e-5)
    # a projection shortcut (stride 2) is measured after the shortcut
    assert np.isfinite(df["skip_var"]).all() and len(df) == 3


def test_no_residual_blocks_is_an_error():
    with pytest.raises(dl.DepthlabError, match="no depthlab Residual blocks"):
        dl.signal_propagation(nn.Sequential(nn.Linear(3, 3)), torch.randn(4, 3))
    model = dl.create_model("mlp", depth=2, width=8)
    with pytest.raises(dl.DepthlabError, match="mode"):
        dl.signal_propagation(model, torch.randn(4, 64), mode="training")


def test_callback_collects_records_with_step():
    torch.manual_seed(0)
    model = dl.create_model(
        "mlp", depth=3, width=16, scheme="skipinit", scheme_options={"alpha_init": 0.5}
    )
    cb = dl.signal_callback(torch.randn(32, 64), every=2)
    for step in (0, 10, 20):
        cb(step, model, None)
        with torch.no_grad():
            for blk in model.blocks:
                blk.gate.alpha.mul_(2.0)
    df = cb.frame()
    assert sorted(df["step"].unique()) == [0, 20]  # every second call
    assert len(df) == 6
    g0 = df[df.step == 0].set_index("block")["gated_var"]
    b0 = df[df.step == 0].set_index("block")["branch_var"]
    np.testing.assert_allclose(g0, 0.25 * b0, rtol=1e-9)  # alpha = 0.5 -> variance × 0.25
