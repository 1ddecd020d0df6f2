"""Config choice on a GPU, checked without one: tuning happens once per bucket of M (a bounded number of
times over every M from 1 to 8,192), the heuristic mode never times, choices save and reload, and the
launch path asks the driver nothing per call."""

from __future__ import annotations

import json

import pytest
import torch

triton = pytest.importorskip("triton")

from fastlora.kernels import _launch, lora_expand, lora_linear, lora_shrink, weight_tile  # noqa: E402
from fastlora.kernels._launch import load_tuning, m_bucket, save_tuning  # noqa: E402

# The weight-format flags of the pointer GEMMs (kernels/weight_tile.weight_args): dense, and NF4.
DENSE = {"WEIGHT_FORMAT": weight_tile.DENSE, "QBLOCK": 1, "DOUBLE_QUANT": False, "NF4_ROWS": False}
NF4 = {"WEIGHT_FORMAT": weight_tile.NF4, "QBLOCK": 64, "DOUBLE_QUANT": True, "NF4_ROWS": True}
# Each kernel with flags its launcher sets (in the launcher's order) and a layer shape.
KERNELS = [
    (lora_linear._FWD, {"HAS_BIAS": True, "DORA": False, **DENSE, "DOT_PRECISION": "ieee", "BLOCK_R": 16}, {"N": 4096, "K": 4096, "R": 16}),
    (lora_linear._BWD, {"DROPOUT": True, "DORA": False, **DENSE, "DOT_PRECISION": "ieee", "BLOCK_R": 16}, {"N": 4096, "K": 4096, "R": 16}),
    (lora_linear._FWD, {"HAS_BIAS": True, "DORA": False, **NF4, "DOT_PRECISION": "ieee", "BLOCK_R": 16}, {"N": 4096, "K": 4096, "R": 16}),
    (lora_linear._BWD, {"DROPOUT": True, "DORA": False, **NF4, "DOT_PRECISION": "ieee", "BLOCK_R": 16}, {"N": 4096, "K": 4096, "R": 16}),
    (lora_linear._FWD_TMA, {"HAS_BIAS": True, "DORA": False, "MULTI": False, "DOT_PRECISION": "ieee", "BLOCK_R": 16}, {"N": 4096, "K": 4096, "R": 16}),
    (lora_linear._BWD_TMA, {"DROPOUT": True, "DORA": False, "MULTI": False, "DOT_PRECISION": "ieee", "BLOCK_R": 16}, {"N": 4096, "K": 4096, "R": 16}),
    (lora_shrink._FWD, {"DROPOUT": False, "DOT_PRECISION": "ieee", "BLOCK_R": 16}, {"K": 4096, "R": 16}),
    (lora_shrink._BWD, {"DROPOUT": True, "DOT_PRECISION": "ieee", "BLOCK_R": 16}, {"K": 4096, "R": 16}),
    (lora_expand._BWD, {"DORA": False, "DOT_PRECISION": "ieee", "BLOCK_M": 256, "BLOCK_R": 16}, {"N": 11008, "R": 16}),
]


def _args(tunable, m: int, sizes: dict) -> list:
    """Positional arguments as the launcher passes them, with the sizes where the kernel takes them."""
    values = {"M": m, **sizes}
    return [values.get(name) for name in tunable.kernel.arg_names]


@pytest.fixture
def fresh_tables(monkeypatch):
    for tunable, *_ in KERNELS:
        monkeypatch.setattr(tunable, "table", {})
        monkeypatch.setattr(tunable, "tunings", 0)
    monkeypatch.delenv(_launch.AUTOTUNE_ENV, raising=False)


def test_m_buckets():
    buckets = [m_bucket(m) for m in range(1, 8193)]
    assert len(set(buckets)) == 14  # 1, 2, 4, ..., 8192
    assert all(b >= m and b < 2 * m for m, b in zip(range(1, 8193), buckets))  # never more than 2x M


@pytest.mark.parametrize("index", range(len(KERNELS)),
                         ids=[k[0].kernel.__name__ + ("_nf4" if k[1].get("WEIGHT_FORMAT") else "") for k in KERNELS])
def test_every_m_from_1_to_8192_tunes_a_bounded_number_of_times(fresh_tables, index):
    tunable, flags, sizes = KERNELS[index]
    timed = []

    def timer(config):  # the autotuner's benchmark, stubbed: the first config is "fastest"
        timed.append(config)
        return 1.0 + len(timed) % 7

    chosen = {}
    for m in range(1, 8193):
        key = tunable.table_key(_args(tunable, m, sizes), flags, 0, 2)
        chosen[m] = tunable.choose(key, flags, 90, 2, timer)
    candidates = list(tunable.configs(flags, 90, 2))
    assert tunable.tunings <= 16, tunable.tunings
    if len(candidates) > 1:
        assert tunable.tunings >= 1 and len(timed) == tunable.tunings * len(candidates)
    else:
        assert not timed  # one candidate: nothing to time
    # The config chosen for a bucket serves every M in it: it is one of the launch's candidates (each
    # valid for any M: tiles are masked), and the same for all M of the bucket.
    for m, config in chosen.items():
        assert config in candidates
        assert config is chosen[m_bucket(m)]


def test_heuristic_mode_never_times(fresh_tables, monkeypatch):
    monkeypatch.setenv(_launch.AUTOTUNE_ENV, "heuristic")
    tunable, flags, sizes = KERNELS[0]

    def timer(config):
        raise AssertionError("heuristic mode timed a config")

    for m in (1, 17, 4096):
        key = tunable.table_key(_args(tunable, m, sizes), flags, 0, 2)
        assert tunable.choose(key, flags, 90, 2, timer) is tunable.configs(flags, 90, 2)[0]
    assert tunable.tunings == 0


def test_bad_autotune_mode(fresh_tables, monkeypatch):
    monkeypatch.setenv(_launch.AUTOTUNE_ENV, "fast")
    tunable, flags, sizes = KERNELS[0]
    key = tunable.table_key(_args(tunable, 64, sizes), flags, 0, 2)
    with pytest.raises(ValueError, match=r"\$FASTLORA_AUTOTUNE: expected one of \['tune', 'heuristic'\], got 'fast'"):
        tunable.choose(key, flags, 90, 2, lambda c: 1.0)


def test_tuning_saves_and_reloads(fresh_tables, tmp_path):
    tunable, flags, sizes = KERNELS[0]
    for m in (1, 100, 3000):
        key = tunable.table_key(_args(tunable, m, sizes), flags, 0, 2)
        tunable.choose(key, flags, 90, 2, lambda c: float(c.kwargs["BLOCK_M"]))  # smallest tile "fastest"
    saved = dict(tunable.table)
    path = tmp_path / "tuning.json"
    save_tuning(path)
    tunable.table.clear()
    assert load_tuning(path) >= len(saved)
    assert {k: (c.kwargs, c.num_warps, c.num_stages) for k, c in tunable.table.items()} == {
        k: (c.kwargs, c.num_warps, c.num_stages) for k, c in saved.items()
    }
    data = json.loads(path.read_text())
    data["triton"] = "0.0.1"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="tuned with Triton 0.0.1"):
        load_tuning(path)


def test_driver_asked_once_per_device(monkeypatch):
    calls = []
    monkeypatch.setattr(_launch, "_capabilities", {})
    monkeypatch.setattr(_launch, "_sm_counts", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: calls.append(i) or (9, 0))

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: calls.append(i) or Props())
    for _ in range(100):
        assert _launch.capability(torch.device("cuda", 0)) == 90
        assert _launch.sm_count(torch.device("cuda", 0)) == 132
    assert len(calls) == 2


def test_public_tuning_functions(fresh_tables, tmp_path):
    import fastlora

    with pytest.raises(TypeError, match="path: expected a file path"):
        fastlora.save_tuning(None)
    fastlora.save_tuning(tmp_path / "t.json")
    assert fastlora.load_tuning(tmp_path / "t.json") == 0  # nothing was tuned in this test
    with pytest.raises(FileNotFoundError):
        fastlora.load_tuning(tmp_path / "missing.json")
