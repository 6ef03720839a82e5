"""Architecture encoding, the accuracy predictor, predictor data (balanced, resumable), evolution under budgets."""
import json
import random

import pytest
import torch

from pyengine.methods.ofa.search import (
    ArchEncoder,
    Efficiency,
    EvolutionConfig,
    LatencyTable,
    collect_accuracy_data,
    evolution_search,
    subnet_key,
    train_predictor,
)
from pyengine.methods.ofa.spaces import get_space
from pyengine.models.ofa_mbv3 import active_slots

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def space():
    return get_space("ofa", 0.25, resolutions=(8, 12, 16))


def test_encoding_is_one_hot_per_active_slot(space):
    enc = ArchEncoder(space)
    assert enc.n_dim == 3 + 20 * (3 + 3)
    sub = space.random_subnet(random.Random(0))
    f = enc.encode(sub)
    assert f.sum() == 1 + 2 * sum(sub["d"])
    assert f[:3].tolist() == [float(r == sub["r"]) for r in (8, 12, 16)]
    for slot in range(20):
        block = f[3 + 6 * slot: 9 + 6 * slot]
        if slot in active_slots(space.arch, sub):
            assert block[:3].tolist() == [float(k == sub["ks"][slot]) for k in (3, 5, 7)]
            assert block[3:].tolist() == [float(e == sub["e"][slot]) for e in (3, 4, 6)]
        else:
            assert block.sum() == 0  # depth is encoded by the empty slots
    # inactive slots do not change the encoding
    other = json.loads(json.dumps(sub))
    for slot in set(range(20)) - set(active_slots(space.arch, sub)):
        other["ks"][slot] = 7
    assert torch.equal(enc.encode(other), f)


def test_predictor_learns_a_known_function(space):
    enc = ArchEncoder(space)
    rng = random.Random(1)
    subs = [space.random_subnet(rng) for _ in range(300)]
    x = enc.encode_many(subs)
    w = torch.linspace(-1, 1, enc.n_dim)
    y = 60 + x @ w * 3
    model, stats = train_predictor(x, y, epochs=40, hidden=128, seed=0)
    assert stats["val_corr"] > 0.9 and stats["n_val"] == 60
    assert stats["val_rmse"] < y.std().item() / 2
    assert float(model.base_acc) == pytest.approx(float(y[torch.randperm(300, generator=torch.Generator().manual_seed(0))[60:]].mean()))
    with pytest.raises(ValueError, match="at least 4"):
        train_predictor(x[:3], y[:3])


def test_collection_is_balanced_and_resumes_to_the_same_records(tmp_path):
    space = get_space("moofa", 0.25, resolutions=(8, 12, 16))
    eff = Efficiency(space, 1, 10)
    whole = collect_accuracy_data(space, lambda s: float(sum(s["d"]) + s["r"]), eff, 12, tmp_path / "a.jsonl", seed=3,
                                  memory_bins=3)
    lo, hi = eff(space.min_subnet())["peak_memory"], eff(space.max_subnet())["peak_memory"]
    width = (hi - lo) / 3
    bins = [min(2, int((r["peak_memory"] - lo) // width)) for r in whole]
    assert sorted(bins) == [0] * 4 + [1] * 4 + [2] * 4  # 12 subnets, 4 per memory bin
    assert len({subnet_key(r["subnet"]) for r in whole}) == 12

    class Stop(Exception):
        pass

    def dying(sub, n=[0]):
        n[0] += 1
        if n[0] == 6:
            raise Stop
        return float(sum(sub["d"]) + sub["r"])

    with pytest.raises(Stop):
        collect_accuracy_data(space, dying, eff, 12, tmp_path / "b.jsonl", seed=3, memory_bins=3)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 5
    counted = []
    resumed = collect_accuracy_data(space, lambda s: counted.append(1) or float(sum(s["d"]) + s["r"]), eff, 12,
                                    tmp_path / "b.jsonl", seed=3, memory_bins=3)
    assert resumed == whole and len(counted) == 7  # only the missing subnets were measured


def test_evolution_respects_budgets_and_beats_random_search(space):
    eff = Efficiency(space, 1, 10)
    enc = ArchEncoder(space)
    # a predictor that prefers bigger networks: the best subnet sits at the budget
    def predict(subs):
        return enc.encode_many(subs)[:, 3:].sum(1) + 5 * torch.tensor([float(s["r"]) for s in subs])

    lo, hi = eff(space.min_subnet())["peak_memory"], eff(space.max_subnet())["peak_memory"]
    budget = int(lo + 0.4 * (hi - lo))
    cfg = EvolutionConfig(population=24, generations=12)
    best = evolution_search(space, predict, eff, {"peak_memory": budget}, cfg, seed=0)
    assert best["peak_memory"] <= budget and eff(best["subnet"])["peak_memory"] == best["peak_memory"]
    assert best["history"] == sorted(best["history"])  # the best never gets worse
    rng = random.Random(0)
    randoms = [s for s in (space.random_subnet(rng) for _ in range(2000)) if eff(s)["peak_memory"] <= budget][:24 * 13]
    assert best["predicted_acc"] >= float(predict(randoms).max())
    # a MACs budget on top
    macs = eff(best["subnet"])["macs"] // 2
    both = evolution_search(space, predict, eff, {"peak_memory": budget, "macs": macs}, cfg, seed=0)
    assert both["macs"] <= macs and both["peak_memory"] <= budget
    # a budget no subnet meets is an error naming it
    with pytest.raises(ValueError, match="below the smallest subnet"):
        evolution_search(space, predict, eff, {"peak_memory": lo - 1}, cfg)
    # a budget only the smallest subnets meet still gives a valid answer (no endless sampling)
    tight = evolution_search(space, predict, eff, {"peak_memory": lo}, EvolutionConfig(population=6, generations=2))
    assert tight["peak_memory"] <= lo


def test_latency_table_times_each_block_shape_once(space):
    table = LatencyTable(space, 1, 10, "cpu", repeats=1)
    sub = space.min_subnet(8)
    ms = table(sub)
    n = len(table.cache)
    assert ms > 0 and n >= 3
    assert table(sub) == ms and len(table.cache) == n  # cached
    eff = Efficiency(space, 1, 10, table)
    assert eff(sub)["latency_ms"] == ms
    best = evolution_search(space, lambda s: torch.zeros(len(s)), eff, {"peak_memory": None, "latency_ms": 2 * ms},
                            EvolutionConfig(population=4, generations=1))
    assert best["latency_ms"] <= 2 * ms
