"""Batching: length buckets keep padding low; packed rows give exactly the unpacked losses."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_ft.data import Sample, collate, epoch_batches, load_datasets, padding_fraction
from mlx_ft.recipe import recipe_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from conftest import chat_corpus  # noqa: E402


def synthetic(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Sample(rng.integers(3, 100, n).tolist(), [False] + [True] * (n - 1)) for n in lengths]


def skewed_lengths(n=2000, seed=0):
    """Mostly short samples and a long tail, like real chat data (median ~100, max 2048)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(100), 1.0, n).astype(int), 8, 2048).tolist()


def test_length_bucketing_wastes_under_10_percent_on_skewed_lengths():
    samples = synthetic(skewed_lengths())
    plans = epoch_batches(samples, 8, 2048, pack=False, seed=0, epoch=0)
    waste = padding_fraction(samples, plans, 2048, pack=False)
    rng = np.random.default_rng(0)
    random_plans = [[[int(i)] for i in b] for b in np.array_split(rng.permutation(len(samples)), len(samples) // 8)]
    random_waste = padding_fraction(samples, random_plans, 2048, pack=False)
    print(f"\npadding waste, skewed lengths, batch 8: bucketed {100 * waste:.1f}%, random batches {100 * random_waste:.1f}%")
    assert waste < 0.10
    packed = epoch_batches(samples, 8, 2048, pack=True, seed=0, epoch=0)
    print(f"padding waste, packed into rows of 2048: {100 * padding_fraction(samples, packed, 2048, pack=True):.1f}%")
    # The figure is what collate really pads to.
    batches = [collate(samples, p, 2048, False) for p in plans]
    assert sum(b.n_padding for b in batches) / sum(b.tokens.size for b in batches) == pytest.approx(waste)


@pytest.mark.parametrize("pack", [False, True])
def test_epoch_plans_cover_every_sample_once_and_are_deterministic(pack):
    samples = synthetic(skewed_lengths(300, seed=1))
    plans = epoch_batches(samples, 4, 2048, pack, seed=7, epoch=0)
    flat = sorted(i for p in plans for row in p for i in row)
    assert flat == list(range(len(samples)))
    assert all(len(p) == 4 for p in plans[:-1]) and 1 <= len(plans[-1]) <= 4  # rows per batch
    assert all(sum(len(samples[i].tokens) for i in row) <= 2048 for p in plans for row in p)
    assert epoch_batches(samples, 4, 2048, pack, seed=7, epoch=0) == plans  # resume replays the epoch
    assert epoch_batches(samples, 4, 2048, pack, seed=7, epoch=1) != plans  # a new epoch, a new order
    assert epoch_batches(samples, 4, 2048, pack, seed=7, epoch=3, shuffle=False) == \
        epoch_batches(samples, 4, 2048, pack, seed=8, epoch=0, shuffle=False)


def test_packed_collate_layout():
    samples = synthetic([5, 3, 6, 2])
    samples[1].mask = [True] * 3  # train_on = "all"-like: a sample whose first token is marked
    plan = [[0, 1], [2, 3]]
    b = collate(samples, plan, 8, pack=True)
    assert b.tokens.shape == (2, 8) and b.tokens.dtype == np.int32
    assert b.segments.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]]
    assert b.tokens[0, 5:8].tolist() == samples[1].tokens
    # The first token of a packed sample is never predicted from the sample before it.
    assert not b.mask[0, 5] and b.mask[0, 6:8].all() and not b.mask[:, 0].any()
    assert b.n_padding == 0 and b.n_supervised == int(b.mask.sum()) == 4 + 2 + 5 + 1
    short = collate(samples, [[3]], 8, pack=True)
    assert short.segments.tolist() == [[0, 0, -1, -1, -1, -1, -1, -1]] and short.n_padding == 6
    unpacked = collate(samples, [[0], [3]], 8, pack=False)
    assert unpacked.segments is None and unpacked.tokens.shape == (2, 8) and unpacked.n_padding == 16 - 5 - 2
    assert not unpacked.mask[1, 2:].any()


# ----------------------------------------------------------------------------------------------
# Packed loss == unpacked loss, through the real model and loss


@pytest.fixture(scope="module")
def model_and_samples(tiny_model_dir, tmp_path_factory):
    from mlx_lm.utils import load

    model, tok = load(str(tiny_model_dir))
    f = tmp_path_factory.mktemp("pack") / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in chat_corpus(8)))
    r = recipe_from_dict({"model": {"path": "x"}, "data": {"train": str(f), "max_seq_len": 160}})
    return model, load_datasets(r, tok).train


def _losses(model, samples, pack, segments=True):
    """(sum of token losses, supervised tokens) over all batches of one packed or unpacked epoch."""
    import mlx.core as mx

    from mlx_ft.losses import loss_sum

    total, n = mx.array(0.0), mx.array(0.0)
    for plan in epoch_batches(samples, 2, 160, pack, seed=0, epoch=0):
        b = collate(samples, plan, 160, pack)
        seg = mx.array(b.segments) if (pack and segments) else None
        s, k = loss_sum(model, mx.array(b.tokens), mx.array(b.mask), seg, chunk_size=0)
        total, n = total + s, n + k
    return total, n


def test_packed_loss_and_grads_equal_one_by_one(model_and_samples):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model, samples = model_and_samples
    plans = epoch_batches(samples, 2, 160, True, seed=0, epoch=0)
    assert max(len(row) for p in plans for row in p) >= 3  # rows really hold several samples

    def mean_loss(pack, segments=True):
        def f(m):
            s, n = _losses(m, samples, pack, segments)
            return s / n
        return f

    packed, g_packed = nn.value_and_grad(model, mean_loss(True))(model)
    alone, g_alone = nn.value_and_grad(model, mean_loss(False))(model)
    n_packed, n_alone = _losses(model, samples, True)[1].item(), _losses(model, samples, False)[1].item()
    print(f"\npacked {packed.item():.7f} vs one by one {alone.item():.7f} over {int(n_alone)} supervised tokens")
    assert n_packed == n_alone == sum(sum(s.mask) for s in samples)
    assert abs(packed.item() - alone.item()) < 1e-5
    ga, gb = dict(tree_flatten(g_packed)), dict(tree_flatten(g_alone))
    assert ga.keys() == gb.keys()
    for k in ga:
        assert mx.allclose(ga[k], gb[k], atol=1e-5, rtol=1e-4).item(), k

    # Without the block-diagonal mask, later samples attend to earlier ones: the check catches it.
    leaky = mean_loss(True, segments=False)(model)
    print(f"without the segment mask: {leaky.item():.7f}")
    assert abs(leaky.item() - alone.item()) > 1e-3


def test_batch_with_everything_truncated_away_gives_no_nan(model_and_samples):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_ft.losses import loss_sum

    model, samples = model_and_samples
    cut = [Sample(s.tokens[:12], [False] * 12) for s in samples[:4]]  # prompts only: nothing supervised
    for pack in (False, True):
        b = collate(cut, epoch_batches(cut, 4, 160, pack, 0, 0)[0], 160, pack)
        assert b.n_supervised == 0

        def f(m):
            s, n = loss_sum(m, mx.array(b.tokens), mx.array(b.mask),
                            mx.array(b.segments) if pack else None, chunk_size=0)
            return s / mx.maximum(n, 1.0)  # how the training loop normalises

        loss, grads = nn.value_and_grad(model, f)(model)
        assert loss.item() == 0.0
        assert all(mx.isfinite(g).all().item() for _, g in tree_flatten(grads))


def test_packing_clustered_lengths():
    """Two length clusters (the demo data: ~54 and ~89 tokens in rows of 256): best-fit
    decreasing alone pads 13%; filling each row's gap exactly gets close to the bound."""
    lengths = [54] * 366 + [89] * 114
    samples = synthetic(lengths)
    plans = epoch_batches(samples, 4, 256, pack=True, seed=0, epoch=0)
    rows = [row for p in plans for row in p]
    waste = padding_fraction(samples, plans, 256, pack=True)
    print(f"\nclustered lengths: {len(rows)} rows (bound {-(-sum(lengths) // 256)}), {100 * waste:.1f}% padding")
    assert sorted(i for row in rows for i in row) == list(range(len(samples)))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert waste < 0.03
