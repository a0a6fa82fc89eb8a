"""data.gpu_decode: loader workers send the files' bytes, `EncodedViews.to` decodes them with nvJPEG.

CI has no GPU. The path up to the decoder runs on the CPU, and the CUDA stream protocol of the
decode with CUDA mocked; the tests that need a GPU are skipped without one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as TF

from conftest import mauctl_env, write_image_folder
from mauctl.data import batch_augment as ba

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")

# Three training loaders of 8 batches of 256 under ulimit -n 1024, each with 2 workers (4 batches
# prefetched by each): prints one line per loader that got through its epoch. Not persistent: the
# workers ignore SIGTERM (a stop is the training process's to handle), so live ones would hold up the exit.
LOADERS_UNDER_A_LOW_FILE_LIMIT = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    from mauctl.data.augment import TwoViews, pretrain_view
    from mauctl.data.batch_augment import make_tensor_loader
    from mauctl.data.loader import EpochSampler, SeededImages, make_loader

    samples = [(str(p), 0) for p in sorted(Path(sys.argv[1]).rglob("*.jpg"))]
    sampler = EpochSampler(len(samples), 256, rank=0, world_size=1, seed=0)
    loaders = {
        "pil": make_loader(SeededImages(samples, TwoViews(pretrain_view("v1", 8)), report_skipped=True),
                           sampler, 2, pin_memory=False, persistent=False),
        "tensor": make_tensor_loader(samples, "v1", 8, sampler, 2, pin_memory=False, persistent=False),
        "gpu_decode": make_tensor_loader(samples, "v1", 8, sampler, 2, pin_memory=False, decode_on="cuda",
                                         persistent=False),
    }
    for name, loader in loaders.items():
        print(name, sum(1 for _ in loader), "batches", flush=True)
""")


@pytest.mark.slow
def test_loaders_send_a_batch_of_256_in_a_few_file_descriptors(tmp_path):
    """Each tensor a worker sends holds a file descriptor until the batch is used. gpu_decode sent two
    per image (bytes, boxes): Errno 24 at batch 256 with 2 workers under ulimit -n 1024, then a hang."""
    write_image_folder(tmp_path, classes=1, per_class=2048, size=(12, 16))
    script = tmp_path / "loaders.py"
    script.write_text(LOADERS_UNDER_A_LOW_FILE_LIMIT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "train")], env=mauctl_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # the loader waits forever for the batch its worker could not send
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert "Too many open files" not in err, out + err[-2000:]
    assert out.split("\n") == ["pil 8 batches", "tensor 8 batches", "gpu_decode 8 batches", ""], err[-2000:]


def test_a_batch_of_encoded_images_is_four_tensors_and_views_of_its_bytes(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=3, size=(40, 32))
    samples = [(str(p), 0) for p in sorted((tmp_path / "train").rglob("*.jpg"))]
    dataset = ba.TensorViews(samples, "v2", 16, decode_on="cuda")
    items = [dataset[(i, 5)] for i in range(len(samples))]
    views, params, labels, skipped = ba.collate_encoded(items)
    assert params.shape == (len(samples), 2, ba.PARAMS) and labels.tolist() == [0] * len(samples)
    assert not skipped
    assert len(views) == len(samples) and views.boxes.shape == (len(samples), 2, 4)
    assert views.sizes.tolist() == [[40, 32]] * len(samples) and views.image_size == 16
    for file, (encoded, *_rest) in zip(views.files(), items):
        assert torch.equal(file, encoded.data)
        assert file.untyped_storage().data_ptr() == views.data.untyped_storage().data_ptr()  # no copies
    cpu_views = torch.stack([item[0] for item in (ba.TensorViews(samples, "v2", 16)[(i, 5)]
                                                  for i in range(len(samples)))])
    assert torch.equal(views.to("cpu"), cpu_views)


def random_images_and_boxes(size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Images of several shapes and two crops of each: RandomResizedCrop's, one of S x S, one enlarged."""
    rng = np.random.default_rng(0)
    shapes = [(37, 53), (64, 48), (20, 90), (size, size), (120, 80)]
    images = [torch.tensor(rng.integers(0, 256, (3, h, w)), dtype=torch.uint8) for h, w in shapes]
    generator = torch.Generator().manual_seed(0)
    boxes = [[ba.crop_box(h, w, (0.08, 1.0), (3 / 4, 4 / 3), generator) for _ in range(2)] for h, w in shapes]
    boxes[1][1] = (3, 5, size, size)  # torchvision's resize returns it as it is
    boxes[2][0] = (2, 7, size // 2, size - 3)  # enlarged
    return images, torch.tensor(boxes)


class CountOps(TorchDispatchMode):
    """Counts the aten ops that write memory (a view launches nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def test_batched_crops_off_the_cpu_are_torchvisions_uint8_resize_in_fewer_ops():
    """On a GPU torchvision resizes uint8 crops by cast, resize, round, cast back, then stacks them;
    _resized_crops_float rounds and casts the whole batch once. Both run here on the CPU, where
    torchvision itself would use its uint8 kernel (within 1 level: the workers' crops)."""
    size = 24
    images, boxes = random_images_and_boxes(size)

    def torchvision_on_a_gpu(img: torch.Tensor, box: list[int]) -> torch.Tensor:
        crop = TF.resized_crop(img.float(), *box, size=[size, size], antialias=True)
        return crop if tuple(box[2:]) == (size, size) else crop.round().to(torch.uint8)

    with CountOps() as per_crop:
        expected = torch.stack([torch.stack([torchvision_on_a_gpu(img, box).to(torch.uint8) for box in pair])
                                for img, pair in zip(images, boxes.tolist())])
    with CountOps() as batched:
        crops = ba._resized_crops_float(images, boxes, size)
    assert crops.dtype == torch.uint8 and crops.shape == (len(images), 2, 3, size, size)
    assert torch.equal(crops, expected)
    assert batched.count <= 4 * len(images) + 3 < per_crop.count  # 22 ops instead of 45
    workers = ba.resized_crops(images, boxes, size)  # on the CPU: torchvision's uint8 resize, as workers do
    assert (crops.int() - workers.int()).abs().max() <= 1


class FakeStream:
    """Stands in for torch.cuda.Stream: CUDA is mocked in the test below (no GPU in CI)."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def __repr__(self) -> str:
        return self.name

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(("wait", self, other))


def test_nvjpeg_writes_on_a_side_stream_that_the_current_stream_then_waits_for(tmp_path, monkeypatch):
    """CUDA is mocked here: fake streams, and a decode_jpeg that decodes on the CPU and notes the stream
    that is current, the one torchvision allocates its outputs on. What is checked is the order
    EncodedViews.to relies on; that nvJPEG then corrupts nothing is checked on a GPU
    (test_on_a_gpu_decoding_corrupts_no_queued_read)."""
    log: list = []
    streams = {"current": FakeStream("current", log)}
    made: list[FakeStream] = []

    def new_stream(device: torch.device) -> FakeStream:
        made.append(FakeStream(f"side({device})", log))
        return made[-1]

    @contextlib.contextmanager
    def stream(s: FakeStream):
        before, streams["current"] = streams["current"], s
        yield
        streams["current"] = before

    def nvjpeg(files, mode, device):
        log.append(("decode", streams["current"]))
        return [decode_jpeg(data, mode=mode) for data in files]

    monkeypatch.setattr(ba, "_DECODE_STREAMS", {}, raising=False)
    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: streams["current"])
    monkeypatch.setattr(ba, "decode_jpeg", nvjpeg)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record", s)))
    write_image_folder(tmp_path, classes=1, per_class=3, size=(40, 32))
    samples = [(str(p), 0) for p in sorted((tmp_path / "train").rglob("*.jpg"))]
    dataset = ba.TensorViews(samples, "v1", 16, decode_on="cuda")
    encoded = ba.collate_encoded([dataset[(i, 2)] for i in range(3)])[0]

    views = encoded.to("cuda:0")
    assert [str(s) for s in made] == ["side(cuda:0)"]
    side, current = made[0], streams["current"]
    assert log == [("decode", side), ("wait", current, side)] + [("record", current)] * 3
    assert torch.equal(views, torch.stack([ba.TensorViews(samples, "v1", 16)[(i, 2)][0] for i in range(3)]))
    encoded.to("cuda:0")
    encoded.to("cuda:1")
    assert [str(s) for s in made] == ["side(cuda:0)", "side(cuda:1)"]  # one side stream per device, made once


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: nvJPEG and CUDA streams")


@needs_gpu
def test_on_a_gpu_decoding_corrupts_no_queued_read():
    assert ba.gpu_decode_ordering_errors("cuda", trials=20) == 0


@needs_gpu
def test_on_a_gpu_the_ordering_check_sees_the_race_of_decoding_on_the_current_stream(monkeypatch):
    """What the side stream is for: torchvision's default, outputs from the current stream's pool
    (pytorch/vision#9606; 19 of 20 trials corrupted on an H200 in the review)."""
    monkeypatch.setattr(ba, "decode_stream", torch.cuda.current_stream)
    assert ba.gpu_decode_ordering_errors("cuda", trials=5) > 0


@needs_gpu
def test_on_a_gpu_batched_crops_are_torchvisions_per_crop_resize():
    size = 24
    images, boxes = random_images_and_boxes(size)
    images = [img.cuda() for img in images]
    expected = torch.stack([torch.stack([ba.resized_crop(img, box, size) for box in pair])
                            for img, pair in zip(images, boxes.tolist())])
    assert torch.equal(ba.resized_crops(images, boxes, size), expected)
