"""Adapters: the TorchIO transforms and the Lightning batch path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qcflow.kspace import RandomArtifacts
from tests.test_kspace import phantom

tio = pytest.importorskip("torchio")
pl = pytest.importorskip("pytorch_lightning")

from qcflow.kspace.lightning import (  # noqa: E402
    KSpaceAugmentBatch,
    KSpaceAugmentMixin,
    batch_augment_from_sampler,
)
from qcflow.kspace.torchio_adapter import (  # noqa: E402
    KSpaceArtifacts,
    RandomKSpaceArtifacts,
    records_from_subject,
)


def subject() -> tio.Subject:
    x = phantom()
    label = (x > 0.5).to(torch.int64)
    return tio.Subject(
        t1=tio.ScalarImage(tensor=x * 100.0, affine=torch.diag(torch.tensor([1.0, 1.2, 0.9, 1.0]))),
        seg=tio.LabelMap(tensor=label),
    )


def test_random_transform_composes_and_records_history() -> None:
    aug = RandomKSpaceArtifacts(RandomArtifacts.paper(rate=1.0))
    pipeline = tio.Compose([tio.RescaleIntensity((0, 1)), aug])
    original = subject()
    torch.manual_seed(0)
    out = pipeline(original)
    names = [t.name for t in out.history]
    assert names == ["RescaleIntensity", "KSpaceArtifacts"]
    # the label map is untouched (intensity transform) and the image is corrupted, in [0, 1]
    assert torch.equal(out.seg.data, original.seg.data)
    assert not torch.allclose(out.t1.data, original.t1.data / 100.0)
    assert float(out.t1.data.min()) >= 0.0 and float(out.t1.data.max()) <= 1.0 + 1e-6
    # records: JSON in the subject, one per image, every kind present
    records = records_from_subject(out)
    assert list(records) == ["t1"] and len(records["t1"]["kinds"]) == 6
    # the composed history replays the corruption exactly
    replay = out.get_composed_history()(original)
    assert torch.equal(replay.t1.data, out.t1.data)
    # same torch seed, same result (TorchIO's seeding semantics)
    torch.manual_seed(0)
    assert torch.equal(pipeline(original).t1.data, out.t1.data)


def test_deterministic_transform_accepts_a_single_record() -> None:
    record = RandomArtifacts(rate=1.0, blur=True, seed=1).sample().to_record()
    out = KSpaceArtifacts(record)(subject())
    assert json.loads(out["artifacts"])["t1"]["kinds"] == ["blur"]
    assert out.history[-1].name == "KSpaceArtifacts"


def test_subjects_collate_in_a_dataloader() -> None:
    aug = RandomKSpaceArtifacts(RandomArtifacts(rate=0.5, noise=True, seed=3))
    dataset = tio.SubjectsDataset([subject(), subject()], transform=aug)
    loader = tio.SubjectsLoader(dataset, batch_size=2)
    batch = next(iter(loader))
    assert batch["t1"][tio.DATA].shape == (2, 1, 32, 40, 36)
    assert len(batch["artifacts"]) == 2 and all(isinstance(r, str) for r in batch["artifacts"])


class _Volumes(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return {"image": phantom((16, 20, 18)) * (1.0 + 0.1 * i), "target": torch.tensor(float(i))}


class _TinyModule(KSpaceAugmentMixin, pl.LightningModule):
    def __init__(self, sampler: RandomArtifacts) -> None:
        super().__init__()
        self.kspace_augment = batch_augment_from_sampler(sampler)
        self.net = torch.nn.Conv3d(1, 1, 3, padding=1)
        self.seen: list = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch["image"].detach().clone(), batch["artifacts"]))
        return (self.net(batch["image"]).mean() - batch["target"].mean()) ** 2

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        assert "artifacts" not in batch  # validation batches stay clean

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_batch_path_runs_in_fast_dev_run(tmp_path: Path) -> None:
    sampler = RandomArtifacts.paper(rate=1.0, device="batch", seed=0)
    module = _TinyModule(sampler)
    assert isinstance(module.kspace_augment, KSpaceAugmentBatch)
    loader = torch.utils.data.DataLoader(_Volumes(), batch_size=2)
    trainer = pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert len(module.seen) == 1
    images, records = module.seen[0]
    clean = torch.stack([_Volumes()[i]["image"] for i in range(2)])
    assert images.shape == clean.shape and not torch.allclose(images, clean)
    assert len(records) == 2 and all(r["kinds"] for r in records)


def test_batch_path_is_off_for_the_loader_device() -> None:
    assert batch_augment_from_sampler(RandomArtifacts(noise=True)) is None
    assert batch_augment_from_sampler(None) is None


def test_batch_augment_containers() -> None:
    aug = KSpaceAugmentBatch(RandomArtifacts(rate=1.0, noise=True, device="batch", seed=0), key=0)
    x = torch.stack([phantom(), phantom()])
    out = aug((x, torch.zeros(2)))
    assert isinstance(out, tuple) and out[0].shape == x.shape and len(aug.last_records) == 2
    aug.key = None
    assert aug(x).shape == x.shape
    with pytest.raises(ValueError):
        aug(x[0])
