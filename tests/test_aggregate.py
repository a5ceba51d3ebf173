"""Aggregation rules on hand-checkable tensors, and validation of client updates."""

import logging
import math

import pytest
import torch

from llmrec.federated import (
    AGGREGATORS,
    UpdateCheck,
    aggregate,
    check_update,
    coordinate_median,
    fedavg,
    filter_updates,
    trimmed_mean,
    update_norm,
)
from llmrec.pseudonyms import pseudonym

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
REFERENCE = {A: torch.Size([2, 4]), B: (4, 2)}


def scalar(value: float) -> dict[str, torch.Tensor]:
    """A one-coordinate update."""
    return {"w": torch.tensor([value], dtype=torch.float32)}


def good(seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A well-formed update matching REFERENCE."""
    g = torch.Generator().manual_seed(seed)
    return {A: scale * torch.randn(2, 4, generator=g), B: scale * torch.randn(4, 2, generator=g)}


# --------------------------------------------------------------------------- rules


def test_fedavg_weighted_by_example_count():
    out = fedavg([scalar(0.0), scalar(4.0)], [1, 3])
    assert out["w"].tolist() == [3.0]
    assert out["w"].dtype == torch.float32


def test_fedavg_keeps_keys_shapes_dtypes():
    updates = [good(0), good(1)]
    out = fedavg(updates, [2.0, 2.0])
    assert out.keys() == updates[0].keys()
    for k in out:
        assert out[k].shape == updates[0][k].shape and out[k].dtype == torch.float32
        torch.testing.assert_close(out[k], (updates[0][k] + updates[1][k]) / 2)


def test_fedavg_is_bitwise_deterministic():
    updates = [good(i, scale=1.0 + i) for i in range(7)]
    weights = [3, 1, 4, 1, 5, 9, 2]
    first = fedavg(updates, weights)
    again = fedavg([{k: v.clone() for k, v in u.items()} for u in updates], list(weights))
    for k in first:
        assert torch.equal(first[k], again[k])


@pytest.mark.parametrize(
    "updates, weights, match",
    [
        ([], [], "no updates"),
        ([scalar(1.0), {"v": torch.ones(1)}], [1, 1], "different keys"),
        ([scalar(1.0), {"w": torch.ones(2)}], [1, 1], "shape"),
        ([scalar(1.0), scalar(2.0)], [0, 0], "total weight"),
        ([scalar(1.0), scalar(2.0)], [2, -1], ">= 0"),
        ([scalar(1.0), scalar(2.0)], [1], "weights"),
    ],
)
def test_fedavg_errors(updates, weights, match):
    with pytest.raises(ValueError, match=match):
        fedavg(updates, weights)


def test_median_ignores_outlier():
    assert coordinate_median([scalar(1), scalar(5), scalar(100)])["w"].tolist() == [5.0]


def test_median_even_count_averages_middle_pair():
    assert coordinate_median([scalar(1), scalar(3), scalar(5), scalar(100)])["w"].tolist() == [4.0]


def test_median_is_per_coordinate():
    ups = [
        {"w": torch.tensor([1.0, 9.0])},
        {"w": torch.tensor([2.0, 7.0])},
        {"w": torch.tensor([3.0, 8.0])},
    ]
    assert coordinate_median(ups)["w"].tolist() == [2.0, 8.0]


def test_trimmed_mean_drops_extremes():
    ups = [scalar(v) for v in (-1000, 1, 2, 3, 1000)]
    # floor(0.2 * 5) = 1 dropped from each end -> mean(1, 2, 3)
    assert trimmed_mean(ups, 0.2)["w"].tolist() == [2.0]
    # floor(0.1 * 5) = 0 dropped -> plain mean
    assert trimmed_mean(ups, 0.1)["w"].item() == pytest.approx(1.2)


def test_trimmed_mean_zero_ratio_is_mean():
    ups = [good(i) for i in range(4)]
    out = trimmed_mean(ups, 0.0)
    torch.testing.assert_close(out[A], torch.stack([u[A] for u in ups]).mean(0))


@pytest.mark.parametrize("ratio", [-0.1, 0.5, 0.7])
def test_trimmed_mean_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="trim_ratio"):
        trimmed_mean([scalar(1), scalar(2)], ratio)


def test_trimmed_mean_rejects_empty():
    with pytest.raises(ValueError, match="no updates"):
        trimmed_mean([], 0.1)


def test_aggregate_dispatches_by_name():
    ups, w = [scalar(1), scalar(5), scalar(100)], [1, 1, 1]
    assert set(AGGREGATORS) == {"fedavg", "median", "trimmed_mean"}
    assert aggregate("fedavg", ups, [1, 1, 2])["w"].item() == pytest.approx(51.5)
    assert aggregate("median", ups, w)["w"].item() == 5.0
    assert aggregate("trimmed_mean", ups, w, trim_ratio=0.34)["w"].item() == 5.0


def test_aggregate_unknown_rule_names_allowed():
    with pytest.raises(ValueError, match=r"allowed: \['fedavg', 'median', 'trimmed_mean'\]"):
        aggregate("krum", [scalar(1)], [1])


# --------------------------------------------------------------------------- validation


def test_update_norm_is_global_l2():
    assert update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == 5.0
    assert update_norm({}) == 0.0
    # fp32 values whose squares overflow fp32 still give a finite norm
    assert math.isfinite(update_norm({"a": torch.full((2,), 3e38)}))


def test_check_update_accepts_good():
    u = good(0)
    check = check_update(u, REFERENCE, max_norm=10.0)
    assert check == UpdateCheck(accepted=True, reason=None, norm=pytest.approx(update_norm(u)))


def _with(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    u = good(0)
    u[key] = value
    return u


BAD_UPDATES = {
    "nan": (_with(A, torch.full((2, 4), float("nan"))), "non-finite"),
    "inf": (_with(B, torch.tensor([[0.0, float("inf")]] * 4)), "non-finite"),
    "-inf": (_with(B, torch.tensor([[0.0, float("-inf")]] * 4)), "non-finite"),
    "huge": (_with(A, torch.full((2, 4), 1e6)), "oversized"),
    "wrong_shape": (_with(A, torch.zeros(4, 2)), "shape"),
    "missing_key": ({A: torch.zeros(2, 4)}, "missing keys"),
    "extra_key": (_with("lm_head.weight", torch.zeros(1)), "unexpected keys"),
    "int_dtype": (_with(A, torch.zeros(2, 4, dtype=torch.int64)), "dtype"),
    "not_tensor": (_with(A, [[0.0] * 4] * 2), "not a tensor"),
    "not_mapping": ([1, 2, 3], "not a mapping"),
}


@pytest.mark.parametrize("name", list(BAD_UPDATES))
def test_check_update_rejects_bad_input_without_raising(name):
    update, reason = BAD_UPDATES[name]
    check = check_update(update, REFERENCE, max_norm=10.0)
    assert not check.accepted
    assert reason in check.reason


def test_check_update_without_max_norm_accepts_large():
    assert check_update(_with(A, torch.full((2, 4), 1e6)), REFERENCE, max_norm=None).accepted


def test_check_update_rejects_bad_max_norm():
    with pytest.raises(ValueError, match="max_norm"):
        check_update(good(0), REFERENCE, max_norm=0.0)


def test_filter_updates_never_lets_poison_into_the_average(caplog):
    clients = {f"user{i}": (good(i), 10.0) for i in range(3)}
    for name, (update, _) in BAD_UPDATES.items():
        clients[f"bad-{name}"] = (update, 10.0)
    clients["bad-count"] = (good(9), float("nan"))
    clients["bad-zero-count"] = (good(9), 0)

    with caplog.at_level(logging.WARNING, logger="llmrec.aggregate"):
        accepted, rejected = filter_updates(clients, REFERENCE, max_norm=10.0)

    assert list(accepted) == ["user0", "user1", "user2"]
    assert set(rejected) == {f"bad-{n}" for n in BAD_UPDATES} | {"bad-count", "bad-zero-count"}
    assert "example count" in rejected["bad-count"]
    for client_id in rejected:
        assert pseudonym(client_id) in caplog.text and client_id not in caplog.text

    out = fedavg([u for u, _ in accepted.values()], [w for _, w in accepted.values()])
    expected = fedavg([good(i) for i in range(3)], [1, 1, 1])
    for k in out:
        assert torch.isfinite(out[k]).all()
        assert torch.equal(out[k], expected[k])
