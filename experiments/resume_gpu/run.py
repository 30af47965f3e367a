"""Does an end-of-epoch resume restore the CUDA random state? (training resume on a GPU)

``qcflow.lit.resume.ResumeState`` stores torch's CPU *and* CUDA generator states (with NumPy's,
Python's and the DataLoader's) in ``last.ckpt`` and restores them when ``trainer.fit`` resumes.
The CPU path is tested bit for bit in ``tests/test_resume_training.py``; CI has no GPU, so this
script checks the CUDA path where one exists: a small network with dropout (its masks come from
the CUDA generator) and data drawn from torch's global RNG is trained for 4 epochs without a
break, and again for 2 epochs, stopped, and resumed to 4 from the epoch-2 ``last.ckpt``, with and
without ``ResumeState``. With it the final weights should equal the uninterrupted run's (GPU
kernels of this size are deterministic); without it the dropout masks after the resume differ.

Usage (needs only torch, numpy and pytorch-lightning): ``python experiments/resume_gpu/run.py``
(``--accelerator cpu`` runs the same check on the CPU). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qcflow.lit.resume import ResumeState  # noqa: E402


class Noisy(torch.utils.data.Dataset):
    """Items drawn from torch's global (CPU) RNG, as the contrastive slices are."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(32) + i % 4


class Toy(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(64, 1)
        )

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        noise = torch.randn(batch.shape[0], 1, device=self.device)  # the CUDA generator
        return (self.net(batch) - noise).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(
    out: Path, epochs: int, ckpt: Path | None, state: bool, accelerator: str
) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    model = Toy()
    save = pl.callbacks.ModelCheckpoint(dirpath=out, save_last=True, monitor=None)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
        callbacks=[save, *([ResumeState()] if state else [])],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(Noisy(), batch_size=8, shuffle=True, generator=gen)
    trainer.fit(model, loader, ckpt_path=ckpt, weights_only=True)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    acc = ap.parse_args().accelerator
    if acc == "gpu" and not torch.cuda.is_available():
        raise SystemExit("resume_gpu: no CUDA device (--accelerator cpu checks the CPU path)")
    torch.use_deterministic_algorithms(True, warn_only=True)
    name = torch.cuda.get_device_name(0) if acc == "gpu" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = fit(root / "full", 4, None, True, acc)
        result = {"device": name, "torch": torch.__version__}
        for state in (True, False):
            part = root / f"part_{state}"
            fit(part, 2, None, state, acc)
            resumed = fit(part, 4, part / "last.ckpt", state, acc)
            equal = all(torch.equal(full[k], resumed[k]) for k in full)
            diff = max(float((full[k] - resumed[k]).abs().max()) for k in full)
            key = "with_resume_state" if state else "lightning_alone"
            result[f"{key}_equal"] = equal
            result[f"{key}_max_abs_diff"] = diff
    print(json.dumps(result))


if __name__ == "__main__":
    main()
