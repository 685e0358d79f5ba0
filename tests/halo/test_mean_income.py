"""MeanIncomePolicy: the mean attention income per row since birth, kept through culls, at every granularity."""

import pytest
import torch

from halo.eval import eval_config, stream_nll
from halo.eval.runner import policy_setup
from halo.mean_income import INCOME_SCALE, MeanIncomePolicy
from halo.text import embedded_text


@pytest.fixture(scope="module")
def pair(tiny_tok):
    from tiny import tiny_llama

    return tiny_llama(vocab=len(tiny_tok)), tiny_tok


@pytest.fixture(scope="module")
def ids(tiny_tok):
    return tiny_tok(embedded_text(max_chars=2000), add_special_tokens=False)["input_ids"][:60]


def _fields(cache, policy=MeanIncomePolicy()):
    n = cache.n_valid
    return (cache.slot_field(policy.income_field)[..., :n], cache.slot_field(policy.income_field + "_rows")[..., :n],
            policy.score_basis(cache)[..., :n])


@pytest.mark.parametrize("granularity", ["token", "layer", "head"])
def test_mean_income_is_the_mass_since_birth_over_the_rows_seen(pair, ids, granularity):
    """Without eviction every slot holds the sum of the mass it was paid and one row per step since its birth."""
    model, tok = pair
    text = ids[:30]
    expected: dict[tuple[int, int], float] = {}

    def track(session):
        cache = session.cache
        n = cache.n_valid
        mass = cache.mass[..., :n] if cache.per_layer else cache.mass[None, :n] / cache.num_layers
        positions = cache.positions[..., :n] if cache.per_layer else cache.positions[None, :n]
        income, rows, basis = (t if cache.per_layer else t[None] for t in _fields(cache))
        for r in range(positions.shape[0]):
            for j, pos in enumerate(positions[r, : int(cache.layer_counts[r]) if cache.per_layer else n].tolist()):
                expected[r, pos] = expected.get((r, pos), 0.0) + float(mass[r, j])
                assert float(income[r, j]) == pytest.approx(expected[r, pos], rel=1e-5, abs=1e-6)
                assert float(rows[r, j]) == cache.seen - pos
                assert float(basis[r, j]) == pytest.approx(INCOME_SCALE * expected[r, pos] / (cache.seen - pos + 40 / 8),
                                                           rel=1e-5, abs=1e-5)

    name = "halo-mean" if granularity == "layer" else f"halo-mean-{granularity}"
    stream_nll(model, tok, text, eval_config(40, sinks=2, recent=4), name, on_step=track)


@pytest.mark.parametrize("name", ["halo-mean", "halo-mean-head"])
def test_rows_and_income_follow_their_tokens_through_culls(pair, ids, name):
    """Compaction moves the fields with the slots, and a slot refilled by a newborn starts from zero."""
    model, tok = pair

    def check(session):
        cache = session.cache
        income, rows, _ = _fields(cache)
        for r in range(rows.shape[0]):
            k = int(cache.layer_counts[r])
            assert rows[r, :k].tolist() == (cache.seen - cache.positions[r, :k]).to(torch.float32).tolist()
            assert bool((income[r, :k] >= 0).all())

    run = stream_nll(model, tok, ids, eval_config(16, sinks=2, recent=4), name, on_step=check)
    assert run.max_retained == 16


def test_a_chunk_counts_the_rows_that_saw_each_new_slot(pair, tiny_tok):
    from halo import HaloConfig, Session

    model, tok = pair
    session = Session(model, tok, HaloConfig(budget=32, chunk_size=8, recent_tokens=8), policy=MeanIncomePolicy())
    session.step(torch.arange(5), "user")
    _, rows, _ = _fields(session.cache)
    assert rows.tolist() == [[5.0, 4.0, 3.0, 2.0, 1.0]] * rows.shape[0]


def test_rows_run_at_the_config_granularity_and_bad_prior_is_refused():
    base = eval_config(32)
    assert policy_setup("halo-mean", base) == ("halo-mean", base.replace(granularity="layer"))
    assert policy_setup("halo-mean-head", base)[1].granularity == "head"
    assert policy_setup("halo-mean-token", base)[1].granularity == "token"
    with pytest.raises(ValueError, match="prior_rows"):
        MeanIncomePolicy(prior_rows=0.0)


def test_dark_bias_of_a_halo_policy_is_its_own_or_the_configs(pair, ids):
    from halo import Session
    from halo.policy import HaloPolicy

    model, tok = pair
    assert MeanIncomePolicy().dark_bias == 0.0 and HaloPolicy().dark_bias is None
    with pytest.raises(ValueError, match="dark_bias"):
        HaloPolicy(dark_bias=float("nan"))
    session = Session(model, tok, eval_config(16, sinks=2, recent=4, dark_bias=0.5))
    for token in ids[:40]:
        session.step(torch.tensor([token]), "user")
    cache = session.cache
    from_config = HaloPolicy().scores(cache)
    assert torch.equal(HaloPolicy(dark_bias=0.5).scores(cache), from_config)
    assert not torch.equal(HaloPolicy(dark_bias=0.0).scores(cache), from_config)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_save_and_load_carry_the_income_and_name_the_policy(pair, tmp_path, granularity):
    from halo import HaloConfig, Session

    model, tok = pair
    config = HaloConfig(budget=24, recent_tokens=4, sink_tokens=2, granularity=granularity)
    session = Session(model, tok, config, policy=MeanIncomePolicy())
    session.feed("The pass key is 52445. " * 6, "user")
    session.save(tmp_path / "memory")
    loaded = Session.load(tmp_path / "memory", model, tok, policy=MeanIncomePolicy())
    assert torch.equal(session.cache.policy.scores(session.cache), loaded.cache.policy.scores(loaded.cache))
    for field in ("mean_income", "mean_income_rows"):
        n = session.cache.n_valid
        assert torch.equal(session.cache.slot_field(field)[..., :n], loaded.cache.slot_field(field)[..., :n])
    with pytest.raises(ValueError, match="halo-mean"):
        Session.load(tmp_path / "memory", model, tok)


@pytest.mark.parametrize("granularity", ["token", "layer"])
def test_markers_and_reset_start_from_zero(pair, granularity):
    """A marker written after a cull holds no earlier token's income when scored, and a reset cache (whose serials
    restart at 0) keeps nothing of the memory before it."""
    from halo import HaloConfig, Session

    model, tok = pair
    policy = MeanIncomePolicy()
    session = Session(model, tok, HaloConfig(budget=40, recent_tokens=8, sink_tokens=2, granularity=granularity),
                      policy=policy)

    def check():
        cache = session.cache
        policy.score_basis(cache)
        n = cache.n_valid
        rows = cache.slot_field(policy.income_field + "_rows")[..., :n]
        positions, sources = cache.positions[..., :n], cache.sources[..., :n]
        counts = cache.layer_counts if cache.per_layer else torch.tensor([n])
        rows, positions, sources = (t if cache.per_layer else t[None] for t in (rows, positions, sources))
        marker = cache.config.source_code("marker")
        for r in range(rows.shape[0]):
            k = int(counts[r])
            age = (cache.seen - positions[r, :k]).to(torch.float32)
            stream = sources[r, :k] != marker
            assert torch.equal(rows[r, :k][stream], age[stream])
            assert bool((rows[r, :k][~stream] <= age[~stream]).all())
        return int((sources == marker).sum())

    session.feed("The pass key is 52445. Remember it.", "user")
    markers = 0
    for i in range(12):
        session.feed(f"build step {i}: compiling module_{i}.c ok\n", "log")
        markers += check()
    assert markers > 0  # markers were written and checked
    session.cache.reset()
    session.feed("Fresh start.", "user")
    check()


def test_word_pooling_scores_a_word_by_the_mean_of_its_tokens(pair):
    from halo import HaloConfig, Session
    from halo.policy import HaloPolicy

    model, tok = pair
    with pytest.raises(ValueError, match="word_pooling"):
        HaloPolicy(word_pooling="min")
    session = Session(model, tok, HaloConfig(budget=64, recent_tokens=8, sink_tokens=2), policy=MeanIncomePolicy())
    session.feed("Identifiers like configuration_manager_factory and 52445 stay whole.", "user")
    cache = session.cache
    n = cache.n_valid
    mean = MeanIncomePolicy().scores(cache)
    best = MeanIncomePolicy(word_pooling="max").scores(cache)
    units = cache.units[:, :n]
    words = [int(u) for u in units[0].unique() if int(u) >= 0 and int((units[0] == u).sum()) > 1]
    assert words
    for u in words:
        where = units[0] == u
        assert bool((mean[0][where] == mean[0][where][0]).all())  # one score for the whole word
        assert float(mean[0][where][0]) == pytest.approx(float(best[0][where].mean()), rel=1e-5, abs=1e-5)


def test_brightness_weight_adds_a_share_of_the_brightness(pair, tiny_tok):
    from halo import HaloConfig, Session

    model, tok = pair
    session = Session(model, tok, HaloConfig(budget=32, chunk_size=8, recent_tokens=8), policy=MeanIncomePolicy())
    session.step(torch.arange(12), "user")
    cache, n = session.cache, session.cache.n_valid
    mean = MeanIncomePolicy().score_basis(cache)[..., :n]
    mixed = MeanIncomePolicy(brightness_weight=0.25).score_basis(cache)[..., :n]
    torch.testing.assert_close(mixed, mean + 0.25 * cache.brightness[..., :n])
    assert not torch.equal(mixed, mean)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="brightness_weight"):
            MeanIncomePolicy(brightness_weight=bad)


@pytest.mark.parametrize("granularity", ["token", "layer", "head"])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_content_weight_counts_each_forward_by_the_share_the_sinks_left(pair, ids, granularity, power):
    """Every forward adds its mass times (1 - the share of it the sink slots drew) ** content_weight."""
    from halo import HaloConfig, Session

    model, tok = pair
    policy = MeanIncomePolicy(content_weight=power)
    session = Session(model, tok, HaloConfig(budget=64, recent_tokens=8, sink_tokens=3, granularity=granularity),
                      policy=policy)
    expected: dict[tuple[int, int], float] = {}
    shares = []
    for chunk in (ids[:5], ids[5:6], ids[6:7], ids[7:8], ids[8:16]):  # a chunk of 5, single rows, a chunk of 8
        session.step(torch.tensor(chunk), "user")
        cache, n = session.cache, session.cache.n_valid
        mass = cache.mass[..., :n] if cache.per_layer else cache.mass[None, :n] / cache.num_layers
        positions = cache.positions[..., :n] if cache.per_layer else cache.positions[None, :n]
        income = cache.slot_field(policy.income_field)[..., :n]
        income = income if cache.per_layer else income[None]
        for r in range(positions.shape[0]):
            k = int(cache.layer_counts[r]) if cache.per_layer else n
            row_mass = mass[r, :k].double()
            share = 1.0 - float(row_mass[positions[r, :k] < 3].sum()) / float(row_mass.sum())
            shares.append(share)
            for j, pos in enumerate(positions[r, :k].tolist()):
                expected[r, pos] = expected.get((r, pos), 0.0) + float(row_mass[j]) * share ** power
                assert float(income[r, j]) == pytest.approx(expected[r, pos], rel=1e-4, abs=1e-6)
    assert min(shares) < 0.99  # the sinks drew mass, so the weights were not all 1
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="content_weight"):
            MeanIncomePolicy(content_weight=bad)


def test_content_share_is_one_without_mass():
    from halo.mean_income import content_share

    mass = torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    positions = torch.tensor([[0, 1, 5, 9], [0, 3, 4, 7]])
    assert content_share(mass, positions, sink_tokens=2).flatten().tolist() == [0.25, 1.0]
