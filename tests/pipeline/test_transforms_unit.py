"""Each built-in transform, the per-sample RNG, and building transforms from config tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batchwire.server import transforms as T
from batchwire.server.config import ConfigError, Table
from batchwire.server.transform_config import build_item_transforms, build_transform_list


def rgb(height: int = 6, width: int = 8, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sample_generator_depends_on_seed_epoch_and_index_only():
    draw = lambda g: torch.rand(4, generator=g)  # noqa: E731
    assert torch.equal(draw(T.sample_generator(1, 2, 3)), draw(T.sample_generator(1, 2, 3)))
    seeds = {T.sample_seed(s, e, i) for s in (0, 1) for e in (0, 1) for i in (0, 1, 2)}
    assert len(seeds) == 12  # (0, 1, 2) and (1, 0, 2) ... never collide as sums would
    assert T.sample_seed(-1, 0, 0) != T.sample_seed(0, 0, 0)


def test_to_tensor_scales_uint8_to_chw_floats():
    image = rgb()
    tensor = T.ToTensor()(image)
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 6, 8)
    assert torch.equal(tensor, expected)
    assert T.ToTensor()(image.convert("L")).shape == (1, 6, 8)
    floats = np.ones((2, 3, 4), dtype=np.float64)
    assert T.ToTensor()(floats).dtype == torch.float64  # only uint8 is rescaled


def test_resize_shorter_edge_and_explicit_size():
    assert T.Resize(3)(rgb(6, 8)).size == (4, 3)  # PIL size is (width, height)
    image = torch.rand(3, 6, 8)
    assert T.Resize([4, 5])(image).shape == (3, 4, 5)
    assert T.Resize(3)(image).shape == (3, 3, 4)
    as_uint8 = T.Resize([3, 4], interpolation="nearest")(torch.arange(48).view(1, 6, 8).byte())
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == (1, 3, 4)
    assert as_uint8[0, 0].tolist() == [0, 2, 4, 6]


def test_center_crop_takes_the_middle_and_refuses_small_images():
    image = torch.arange(48).view(1, 6, 8)
    assert torch.equal(T.CenterCrop([2, 4])(image), image[:, 2:4, 2:6])
    assert T.CenterCrop(4)(rgb(6, 8)).size == (4, 4)
    with pytest.raises(ValueError, match="larger than the image"):
        T.CenterCrop(7)(image)


def test_random_crop_draws_its_position_from_the_generator():
    image = torch.arange(48).view(1, 6, 8)
    crop = T.RandomCrop([3, 4])
    reference = gen(5)
    top = int(torch.randint(0, 4, (1,), generator=reference))
    left = int(torch.randint(0, 5, (1,), generator=reference))
    assert torch.equal(crop(image, gen(5)), image[:, top : top + 3, left : left + 4])
    corners = {tuple(crop(image, gen(s))[0, 0, :1].tolist()) for s in range(200)}
    assert len(corners) == 20  # every one of the 4 x 5 positions is reachable


def test_random_crop_pads_with_fill_and_agrees_on_pil_and_tensor():
    padded = T.RandomCrop(8, padding=1, fill=-1.0)(torch.zeros(1, 6, 6), gen(0))
    assert padded.shape == (1, 8, 8) and set(padded.unique().tolist()) == {-1.0, 0.0}
    image = rgb(10, 12)
    crop = T.RandomCrop([6, 7], padding=2)
    for seed in range(5):
        via_pil = T.ToTensor()(crop(image, gen(seed)))
        via_tensor = crop(T.ToTensor()(image), gen(seed))
        assert torch.equal(via_pil, via_tensor)


def test_horizontal_flip_probability_and_draw():
    image = torch.arange(12).view(1, 3, 4)
    assert torch.equal(T.RandomHorizontalFlip(1.0)(image, gen()), image.flip(-1))
    assert torch.equal(T.RandomHorizontalFlip(0.0)(image, gen()), image)
    for seed in range(10):
        flips = float(torch.rand(1, generator=gen(seed))) < 0.5
        out = T.RandomHorizontalFlip(0.5)(image, gen(seed))
        assert torch.equal(out, image.flip(-1) if flips else image)
    pil = rgb()
    assert np.array_equal(
        np.asarray(T.RandomHorizontalFlip(1.0)(pil, gen())), np.asarray(pil)[:, ::-1]
    )


def test_normalize_per_channel_and_its_errors():
    x = torch.ones(2, 2, 2)
    out = T.Normalize([0.5, 1.0], [0.25, 2.0])(x)
    assert out[0].eq(2.0).all() and out[1].eq(0.0).all()
    with pytest.raises(TypeError, match="add ToTensor"):
        T.Normalize([0.5], [0.5])(torch.ones(1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2 channels"):
        T.Normalize([0.5, 0.5], [1, 1])(torch.ones(3, 2, 2))


def test_compose_applies_in_order_from_one_generator():
    composed = T.Compose([T.ToTensor(), T.RandomCrop(4), T.RandomHorizontalFlip()])
    g = gen(3)
    by_hand = T.RandomHorizontalFlip()(T.RandomCrop(4)(T.ToTensor()(rgb()), g), g)
    assert torch.equal(composed(rgb(), gen(3)), by_hand)


# -- from config tables -------------------------------------------------------------------------


def table(data) -> Table:
    return Table(data, file=Path("/cfg/x.toml"), prefix="datasets.d")


def test_transform_lists_accept_names_tables_and_import_paths():
    built = build_transform_list(
        table(
            {
                "t": [
                    "ToTensor",
                    {"name": "RandomCrop", "size": [4, 5], "padding": 1},
                    {"name": "Compose", "transforms": ["RandomHorizontalFlip"]},
                    {"name": "torch:neg"},
                    {"name": "pipeline_data:scale_by", "kwargs": {"factor": 3}},
                    {"name": "torch.nn:Dropout", "kwargs": {"p": 0.0}},
                ]
            }
        ),
        "t",
    )
    assert [repr(t) for t in built] == [
        "ToTensor()",
        "RandomCrop(size=[4, 5], padding=1, fill=0.0)",
        "Compose([RandomHorizontalFlip(p=0.5)])",
        "torch:neg",
        "pipeline_data:scale_by",
        "torch.nn:Dropout",
    ]
    assert torch.equal(built[3](torch.ones(2), gen()), -torch.ones(2))
    assert torch.equal(built[4](torch.ones(2), gen()), torch.full((2,), 3.0))
    assert torch.equal(built[5](torch.ones(2), gen()), torch.ones(2))


BAD = {
    "unknown name": ({"name": "RandomRotate"}, "datasets.d.t[0].name", "unknown transform"),
    "bad size": ({"name": "RandomCrop", "size": 0}, "datasets.d.t[0].size", "positive integer"),
    "bad p": ({"name": "RandomHorizontalFlip", "p": 2}, "datasets.d.t[0].p", "[0, 1]"),
    "unknown param": (
        {"name": "Resize", "size": 4, "sise": 4},
        "datasets.d.t[0].sise",
        "unknown key",
    ),
    "mean/std": (
        {"name": "Normalize", "mean": [0.5, 0.5], "std": [1.0]},
        "datasets.d.t[0].std",
        "has 1 values but mean has 2",
    ),
    "zero std": (
        {"name": "Normalize", "mean": [0.5], "std": [0]},
        "datasets.d.t[0].std",
        "must not contain 0",
    ),
    "bad import": ({"name": "no_such_mod_q:f"}, "datasets.d.t[0].name", "cannot import module"),
    "not a table": (3, "datasets.d.t[0]", "expected a transform name or table"),
    "factory raises": (
        {"name": "pipeline_data:scale_by", "kwargs": {"factr": 2}},
        "datasets.d.t[0].kwargs",
        "raised TypeError",
    ),
    "nested": (
        {"name": "Compose", "transforms": [{"name": "Nope"}]},
        "datasets.d.t[0].transforms[0].name",
        "unknown transform 'Nope'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_transform_entries_name_the_key_and_reason(case):
    entry, key, reason = BAD[case]
    with pytest.raises(ConfigError) as info:
        build_transform_list(table({"t": [entry]}), "t")
    assert info.value.key == key and reason in info.value.reason
    assert "/cfg/x.toml" in str(info.value)


def test_per_field_transforms_check_the_source_field_names():
    with pytest.raises(ConfigError, match=r"transforms.imgae: unknown field; .* image, label"):
        build_item_transforms(
            table({"transforms": {"imgae": ["ToTensor"]}}), "transforms", ("image", "label")
        )
    item_transforms = build_item_transforms(
        table({"transforms": {"label": [{"name": "torch:neg"}]}}), "transforms", ("image", "label")
    )
    assert item_transforms((7, torch.tensor(3)), gen()) == (7, torch.tensor(-3))
    by_position = build_item_transforms(
        table({"transforms": {"1": [{"name": "torch:neg"}]}}), "transforms"
    )
    assert by_position([1, torch.tensor(2)], gen())[1].item() == -2
    on_dict = build_item_transforms(
        table({"transforms": {"x": [{"name": "torch:neg"}]}}), "transforms"
    )
    assert on_dict({"x": torch.tensor(1), "y": 2}, gen()) == {"x": torch.tensor(-1), "y": 2}
    with pytest.raises(KeyError, match="no field 'x'"):
        on_dict({"z": 1}, gen())
