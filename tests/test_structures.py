"""Batching (detr.data.batch): ImageBatch pads bottom/right with zeros and marks the padding; collation."""

from __future__ import annotations

import pytest
import torch

from detr import ImageBatch
from detr.data import collate_detection
from detr.structures import as_image_batch


def images() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.rand(3, 5, 7) + 1, torch.rand(3, 8, 4) + 1, torch.rand(3, 2, 2) + 1]  # no zero pixel


def test_images_sit_top_left_with_zeros_below_and_right():
    batch = ImageBatch.from_images(images())
    assert batch.pixels.shape == (3, 3, 8, 7) and batch.padding_mask.shape == (3, 8, 7)
    assert batch.padding_mask.dtype == torch.bool and len(batch) == 3
    for i, image in enumerate(images()):
        _, h, w = image.shape
        assert torch.equal(batch.pixels[i, :, :h, :w], image)
        expected_mask = torch.ones(8, 7, dtype=torch.bool)
        expected_mask[:h, :w] = False
        assert torch.equal(batch.padding_mask[i], expected_mask)
        assert (batch.pixels[i][:, expected_mask] == 0).all()  # padding is zeros
    assert batch.image_sizes == [(5, 7), (8, 4), (2, 2)]


@pytest.mark.parametrize(("divisor", "size"), [(0, (8, 7)), (1, (8, 7)), (4, (8, 8)), (32, (32, 32)), (3, (9, 9))])
def test_size_divisibility_rounds_the_padded_size_up(divisor, size):
    batch = ImageBatch.from_images(images(), size_divisibility=divisor)
    assert tuple(batch.pixels.shape[-2:]) == size and tuple(batch.padding_mask.shape[-2:]) == size
    assert batch.image_sizes == [(5, 7), (8, 4), (2, 2)]
    # everything outside each image is padding: the mask counts exactly the pixels the images don't cover
    assert (~batch.padding_mask).sum().item() == 5 * 7 + 8 * 4 + 2 * 2
    assert (batch.pixels != 0).sum().item() == 3 * (5 * 7 + 8 * 4 + 2 * 2)


def test_the_batch_is_a_copy_and_keeps_dtype():
    source = [torch.ones(3, 4, 4, dtype=torch.float64), torch.ones(3, 2, 6, dtype=torch.float64)]
    batch = ImageBatch.from_images(source)
    assert batch.pixels.dtype == torch.float64
    batch.pixels.zero_()
    assert (source[0] == 1).all()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="empty"):
        ImageBatch.from_images([])
    with pytest.raises(ValueError, match="image 1 must be CHW"):
        ImageBatch.from_images([torch.zeros(3, 4, 4), torch.zeros(4, 4)])


def test_as_image_batch_accepts_tensors_and_lists():
    dense = torch.rand(2, 3, 6, 5)
    batch = as_image_batch(dense)
    assert batch.pixels is dense and not batch.padding_mask.any() and batch.image_sizes == [(6, 5), (6, 5)]
    single = as_image_batch(dense[0])
    assert single.pixels.shape == (1, 3, 6, 5) and single.image_sizes == [(6, 5)]
    assert as_image_batch(batch) is batch
    assert as_image_batch(images()).image_sizes == [(5, 7), (8, 4), (2, 2)]
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        as_image_batch(torch.zeros(1, 1, 3, 6, 5))


def test_collate_pads_keeps_targets_in_order_and_counts_dropped_items():
    targets = [{"image_id": torch.tensor([i])} for i in range(3)]
    items = [(images()[0], targets[0]), None, (images()[1], targets[1]), (images()[2], targets[2]), None]
    collated = collate_detection(items, size_divisibility=4)
    pixels, listed = collated  # unpacks like a tuple
    assert collated.skipped == 2 and listed == targets
    assert pixels.image_sizes == [(5, 7), (8, 4), (2, 2)] and tuple(pixels.pixels.shape[-2:]) == (8, 8)
    assert torch.equal(pixels.pixels[1, :, :8, :4], images()[1])
    empty = collate_detection([None, None])
    assert empty.images is None and empty.targets == [] and empty.skipped == 2
