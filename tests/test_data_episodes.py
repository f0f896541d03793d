"""EpisodeSampler on the real Omniglot copy (decoded once per session) and on small synthetic
class sets with unequal class sizes."""
import io

import pytest
import torch

from _data_helpers import real_omniglot
from imaml_fast.data import Episode, EpisodeSampler, ImageClasses, omniglot_split


@pytest.fixture(scope="session")
def omniglot(tmp_path_factory):
    return real_omniglot(tmp_path_factory)[0]


def expected_images(classes, ids, rotations, n_per_class):
    """What the episode's images must be, recomputed from the uint8 tensor one by one:
    image ids[t, j], rotated counterclockwise by its class's rotation, / 255."""
    T, M = ids.shape
    out = torch.empty(T, M, *classes.image_shape)
    for t in range(T):
        for j in range(M):
            k = int(rotations[t, j // n_per_class]) // 90
            out[t, j] = torch.rot90(classes.images[ids[t, j]], k, dims=(-2, -1)).float() / 255
    return out


def test_omniglot_train_episode_shapes_labels_and_content(omniglot):
    T, N, K, Q = 6, 5, 2, 3
    s = omniglot.sampler("train", N, K, Q, T, seed=3)
    train = s.classes
    assert s.n_classes == 4800 and train.n_classes == 1200 and s.rotations == (0, 90, 180, 270)
    ep = s.sample()
    assert ep.x_support.shape == (T, N * K, 1, 28, 28) and ep.x_query.shape == (T, N * Q, 1, 28, 28)
    assert ep.x_support.dtype == ep.x_query.dtype == torch.float32
    assert ep.y_support.dtype == ep.y_query.dtype == torch.long
    assert ep.x_support.device.type == ep.y_query.device.type == "cpu"
    # class-major, balanced labels 0..N-1: K (Q) of each
    assert torch.equal(ep.y_support, torch.arange(N).repeat_interleave(K).expand(T, -1))
    assert torch.equal(ep.y_query, torch.arange(N).repeat_interleave(Q).expand(T, -1))
    # the pixels are the drawn images, rotated as their class says, in [0, 1] with 1 = ink
    assert torch.equal(ep.x_support, expected_images(train, ep.support_ids, ep.rotations, K))
    assert torch.equal(ep.x_query, expected_images(train, ep.query_ids, ep.rotations, Q))
    assert 0 <= ep.x_support.min() and ep.x_support.max() <= 1
    # support and query of a label: the same character, different drawers
    sup = ep.support_ids.view(T, N, K)
    qry = ep.query_ids.view(T, N, Q)
    assert torch.equal(sup // 20, ep.classes[..., None].expand(-1, -1, K))
    assert torch.equal(qry // 20, ep.classes[..., None].expand(-1, -1, Q))
    for t in range(T):
        for n in range(N):
            drawn = sup[t, n].tolist() + qry[t, n].tolist()
            assert len(set(drawn)) == K + Q
        pairs = {(int(c), int(r)) for c, r in zip(ep.classes[t], ep.rotations[t])}
        assert len(pairs) == N  # N distinct (character, rotation) classes per task
    assert set(ep.rotations.unique().tolist()) <= {0, 90, 180, 270}


def test_omniglot_test_sampler_uses_test_characters_unrotated(omniglot):
    s = omniglot.sampler("test", 5, 1, 1, 64, seed=0)
    assert s.n_classes == 423 and s.rotations == (0,)
    ep = s.sample()
    names = {s.classes.names[c] for c in ep.classes.flatten().tolist()}
    assert names <= set(omniglot_split().test)
    assert not names & set(omniglot_split().train)
    assert (ep.rotations == 0).all()


def test_rotated_classes_are_rot90_of_the_unrotated_class(omniglot):
    """Every image of a rotated class is torch.rot90 of that character's unrotated image."""
    train = omniglot.split()[0]
    s = EpisodeSampler(train, 20, 5, 15, 16, rotations=(0, 90, 180, 270), seed=1)
    ep = s.sample()
    for x, ids, per_class in ((ep.x_support, ep.support_ids, 5), (ep.x_query, ep.query_ids, 15)):
        unrotated = train.images[ids].float() / 255                   # [T, N*k, 1, 28, 28]
        rotation = ep.rotations.repeat_interleave(per_class, dim=1)  # [T, N*k]
        for r in (0, 90, 180, 270):
            m = rotation == r
            assert m.sum() > 100  # every rotation is drawn, often
            assert torch.equal(x[m], torch.rot90(unrotated[m], r // 90, dims=(-2, -1)))
            if r:
                assert not torch.equal(x[m], unrotated[m])


def test_rotation_is_counterclockwise():
    img = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    img[0, 0, 0, 2] = 255  # top-right corner
    classes = ImageClasses(img.repeat(2, 1, 1, 1), torch.tensor([2]), ("a",))
    s = EpisodeSampler(classes, 1, 1, 1, 1, rotations=(90,), seed=0)
    x = s.sample().x_support[0, 0, 0]
    assert x[0, 0] == 1 and x.sum() == 1  # top-right moves to top-left


def test_same_seed_same_episodes_other_seed_other_episodes(omniglot):
    train = omniglot.split()[0]
    a = EpisodeSampler(train, 5, 1, 5, 8, rotations=(0, 90, 180, 270), seed=11)
    b = EpisodeSampler(train, 5, 1, 5, 8, rotations=(0, 90, 180, 270), seed=11)
    c = EpisodeSampler(train, 5, 1, 5, 8, rotations=(0, 90, 180, 270), seed=12)
    for _ in range(3):
        ea, eb, ec = a.sample(), b.sample(), c.sample()
        for field in ("x_support", "x_query", "classes", "rotations", "support_ids", "query_ids"):
            assert torch.equal(getattr(ea, field), getattr(eb, field))
        assert not torch.equal(ea.classes, ec.classes)
    assert not torch.equal(a.sample().support_ids, ea.support_ids)  # the stream moves on


def test_state_dict_resumes_bit_identically(omniglot):
    train = omniglot.split()[0]
    kw = dict(rotations=(0, 90, 180, 270), seed=5)
    a = EpisodeSampler(train, 5, 1, 5, 8, **kw)
    for _ in range(4):
        a.sample()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as a checkpoint would
    expected = [a.sample() for _ in range(3)]
    b = EpisodeSampler(train, 5, 1, 5, 8, rotations=(0, 90, 180, 270), seed=999)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for e in expected:
        got = b.sample()
        assert torch.equal(got.x_support, e.x_support) and torch.equal(got.x_query, e.x_query)
        assert torch.equal(got.support_ids, e.support_ids) and torch.equal(got.classes, e.classes)
    other = EpisodeSampler(train, 20, 1, 5, 8, **kw)
    with pytest.raises(ValueError, match="n_way: saved 5, here 20"):
        other.load_state_dict(a.state_dict())
    test_classes = omniglot.split()[1]  # the same settings on other classes cannot resume either
    with pytest.raises(ValueError, match="classes_sha256"):
        EpisodeSampler(test_classes, 5, 1, 5, 8, **kw).load_state_dict(a.state_dict())


def test_images_on_cpu_and_float64_give_the_same_episodes(omniglot):
    test = omniglot.split()[1]
    a = EpisodeSampler(test, 5, 1, 2, 4, seed=2).sample()
    b = EpisodeSampler(test, 5, 1, 2, 4, seed=2, images_on_device=False,
                       dtype=torch.float64).sample()
    assert b.x_support.dtype == torch.float64
    assert torch.equal(a.x_support, b.x_support.float()) and torch.equal(a.query_ids, b.query_ids)
    xs, ys, xq, yq = a  # unpacks as meta_step's four inputs
    assert xs is a.x_support and yq is a.y_query and isinstance(a, Episode)


def unequal_classes():
    counts = torch.tensor([3, 7, 5, 12])
    rows = torch.arange(int(counts.sum()), dtype=torch.uint8)  # each image holds its row number
    images = rows.view(-1, 1, 1, 1).expand(-1, 2, 4, 4).contiguous()
    return ImageClasses(images, counts, ("a", "b", "c", "d"))


def test_unequal_class_sizes_sample_without_replacement_within_the_class():
    classes = unequal_classes()
    s = EpisodeSampler(classes, 3, 1, 2, 50, seed=0)
    offsets, counts = classes.offsets, classes.counts
    used = set()
    for _ in range(10):
        ep = s.sample()
        # each image encodes its own row: the pixels prove which images were gathered
        rows = torch.cat([ep.support_ids.view(50, 3, 1), ep.query_ids.view(50, 3, 2)], -1)
        assert torch.equal((ep.x_support[:, :, 0, 0, 0] * 255).round().long(), ep.support_ids)
        lo = offsets[ep.classes][..., None]
        hi = lo + counts[ep.classes][..., None]
        assert ((rows >= lo) & (rows < hi)).all()
        assert all(len(set(r)) == 3 for r in rows.view(-1, 3).tolist())
        used.update(rows.flatten().tolist())
    assert used == set(range(classes.n_images))  # every image of every class is reachable


def test_class_choice_covers_all_classes_uniformly_enough(omniglot):
    s = omniglot.sampler("test", 5, 1, 1, 200, seed=0)
    counts = torch.bincount(torch.cat([s.sample().classes.flatten() for _ in range(10)]),
                            minlength=423)
    assert (counts > 0).all() and counts.max() < 3 * counts.float().mean()


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_way=0), "n_way=0 is invalid"),
    (dict(n_way=5), r"n_way=5 but there are only 4 classes x 1 rotations"),
    (dict(k_shot=2, q_query=2), r"fewer than k_shot \+ q_query = 4 images, e.g. 'a' \(3\)"),
    (dict(q_query=0), "q_query=0 is invalid"),
    (dict(tasks=True), "tasks=True is invalid"),
    (dict(rotations=(0, 45)), "rotations=.*invalid"),
    (dict(rotations=(0, 0)), "rotations=.*distinct"),
    (dict(dtype=torch.long), "dtype=.*floating"),
    (dict(device="nonsense"), "device='nonsense' is invalid"),
])
def test_bad_arguments(kwargs, match):
    args = dict(n_way=2, k_shot=1, q_query=1, tasks=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        EpisodeSampler(unequal_classes(), **args)


def test_quarter_rotations_need_square_images():
    classes = ImageClasses(torch.zeros(4, 1, 3, 5, dtype=torch.uint8), torch.tensor([2, 2]),
                           ("a", "b"))
    with pytest.raises(ValueError, match="square"):
        EpisodeSampler(classes, 2, 1, 1, 1, rotations=(0, 90))
    assert EpisodeSampler(classes, 2, 1, 1, 1, rotations=(0, 180)).sample().x_query.shape == (
        1, 2, 1, 3, 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_episodes_equal_cpu_episodes(omniglot):
    train = omniglot.split()[0]
    kw = dict(rotations=(0, 90, 180, 270), seed=4)
    cpu = EpisodeSampler(train, 5, 1, 5, 32, **kw).sample()
    gpu = EpisodeSampler(train, 5, 1, 5, 32, device="cuda", **kw).sample()
    assert gpu.x_support.is_cuda and gpu.y_query.is_cuda
    for field in ("x_support", "y_support", "x_query", "y_query"):
        assert torch.equal(getattr(gpu, field).cpu(), getattr(cpu, field))
