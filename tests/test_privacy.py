"""Client-level DP: clipping bound, calibrated noise, and the opacus RDP accountant."""

import math
import subprocess
import sys

import pytest
import torch

from llmrec.federated import (
    PrivacyAccountant,
    add_noise,
    clip_update,
    fedavg,
    private_mean,
    update_norm,
)


def update(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": scale * torch.randn(8, 16, generator=g),
        "b": scale * torch.randn(16, 8, generator=g),
    }


# --------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 100.0, 1e6])
def test_clip_bound_holds(scale):
    u = update(0, scale)
    clipped, norm = clip_update(u, clip_norm=1.0)
    assert norm == pytest.approx(update_norm(u))
    assert update_norm(clipped) <= 1.0 * (1 + 1e-6)
    assert clipped.keys() == u.keys()
    assert all(clipped[k].dtype == u[k].dtype for k in u)


def test_clip_leaves_small_update_unchanged_and_keeps_direction():
    small = {"w": torch.tensor([0.3, 0.4])}
    clipped, norm = clip_update(small, clip_norm=1.0)
    assert norm == pytest.approx(0.5) and torch.equal(clipped["w"], small["w"])

    big = {"w": torch.tensor([3.0, 4.0])}
    clipped, norm = clip_update(big, clip_norm=1.0)
    assert norm == 5.0
    torch.testing.assert_close(clipped["w"], torch.tensor([0.6, 0.8]))
    assert big["w"].tolist() == [3.0, 4.0]  # input not mutated


def test_clip_zero_update_and_bad_args():
    clipped, norm = clip_update({"w": torch.zeros(3)}, 1.0)
    assert norm == 0.0 and torch.equal(clipped["w"], torch.zeros(3))
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update({"w": torch.ones(1)}, 0.0)
    with pytest.raises(ValueError, match="validate"):
        clip_update({"w": torch.tensor([float("nan")])}, 1.0)


# --------------------------------------------------------------------------- noise


def test_noise_is_present_and_seeded():
    mean = fedavg([update(i, 0.1) for i in range(4)], [1, 1, 1, 1])
    noisy = add_noise(mean, 1.0, 1.0, 4, torch.Generator().manual_seed(7))
    same = add_noise(mean, 1.0, 1.0, 4, torch.Generator().manual_seed(7))
    other = add_noise(mean, 1.0, 1.0, 4, torch.Generator().manual_seed(8))
    for k in mean:
        assert not torch.equal(noisy[k], mean[k])
        assert torch.equal(noisy[k], same[k])
        assert not torch.equal(noisy[k], other[k])
        assert noisy[k].dtype == mean[k].dtype and noisy[k].shape == mean[k].shape


def test_noise_std_matches_formula():
    z, clip, n = 1.3, 0.5, 10
    expected = z * clip / n  # 0.065
    zeros = {"w": torch.zeros(200_000)}
    noise = add_noise(zeros, z, clip, n, torch.Generator().manual_seed(0))["w"].double()
    assert noise.mean().item() == pytest.approx(0.0, abs=5 * expected / math.sqrt(200_000))
    # the sample std of 2e5 Gaussians is within ~0.3% of sigma at 2 standard errors
    assert noise.std().item() == pytest.approx(expected, rel=0.01)


def test_zero_noise_multiplier_is_identity_and_bad_args():
    mean = {"w": torch.tensor([1.0, 2.0])}
    assert torch.equal(add_noise(mean, 0.0, 1.0, 3, torch.Generator())["w"], mean["w"])
    with pytest.raises(ValueError, match="noise_multiplier"):
        add_noise(mean, -1.0, 1.0, 3, torch.Generator())
    with pytest.raises(ValueError, match="n_clients"):
        add_noise(mean, 1.0, 1.0, 0, torch.Generator())


def test_private_mean_is_uniform_mean_of_clipped_plus_noise():
    ups = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 0.1])}]
    noiseless, norms = private_mean(ups, 1.0, 0.0, torch.Generator())
    assert norms == pytest.approx([5.0, 0.1])
    torch.testing.assert_close(noiseless["w"], torch.tensor([0.3, 0.45]))
    noisy, _ = private_mean(ups, 1.0, 1.0, torch.Generator().manual_seed(0))
    expected = add_noise(noiseless, 1.0, 1.0, 2, torch.Generator().manual_seed(0))
    assert not torch.equal(noisy["w"], noiseless["w"])
    assert torch.equal(noisy["w"], expected["w"])


# --------------------------------------------------------------------------- accounting


def test_epsilon_grows_with_rounds():
    acc = PrivacyAccountant(noise_multiplier=1.0, sample_rate=0.1, delta=1e-5)
    assert acc.epsilon == 0.0 and acc.rounds == 0
    eps = []
    for _ in range(5):
        acc.step()
        eps.append(acc.epsilon)
    assert acc.rounds == 5
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert eps == sorted(eps) and eps[0] < eps[-1]


def test_epsilon_shrinks_with_more_noise():
    def eps_after(z: float, rounds: int = 20) -> float:
        acc = PrivacyAccountant(noise_multiplier=z, sample_rate=0.1, delta=1e-5)
        for _ in range(rounds):
            acc.step()
        return acc.epsilon

    assert eps_after(0.8) > eps_after(1.0) > eps_after(2.0) > eps_after(4.0)


def test_epsilon_known_setting():
    # Abadi et al. 2016's setting (q=0.01, sigma=4, 10k steps, delta=1e-5): their moments
    # accountant gives ~1.26; RDP is at least as tight (opacus 1.6.0 gives ~1.04).
    acc = PrivacyAccountant(4.0, 0.01, 1e-5, adjacency="add-remove")
    for _ in range(10_000):
        acc.step()
    assert math.isfinite(acc.epsilon)
    assert 0.5 < acc.epsilon < 1.26


def test_a_fixed_count_mean_is_charged_at_half_the_noise():
    """Replace-one adjacency (the server's fixed-count mean) doubles the sensitivity: its
    epsilon is add/remove's at noise multiplier z / 2, far above add/remove's at z. The
    former ml100k.yaml setting (z = 1, 8 of 16 clients, 6 rounds, delta 1e-5) is about 26, not 9."""

    def spent(z, adjacency, rounds=6):
        acc = PrivacyAccountant(z, 0.5, 1e-5, adjacency=adjacency)
        for _ in range(rounds):
            acc.step()
        return acc.epsilon

    assert spent(1.0, "replace-one") == pytest.approx(spent(0.5, "add-remove"), rel=1e-12)
    assert spent(1.0, "replace-one") > 2 * spent(1.0, "add-remove")
    assert 20 < spent(1.0, "replace-one") < 32 and 7 < spent(1.0, "add-remove") < 11
    with pytest.raises(ValueError, match="adjacency"):
        PrivacyAccountant(1.0, 0.5, 1e-5, adjacency="swap")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
    ],
)
def test_accountant_rejects_bad_args(kwargs, match):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.5, "delta": 1e-5} | kwargs
    with pytest.raises(ValueError, match=match):
        PrivacyAccountant(**args)


def test_importing_privacy_does_not_import_opacus():
    code = "import sys, llmrec.federated.privacy; assert 'opacus' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
