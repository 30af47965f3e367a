"""Hostile and faulty files qcflow is handed: each gets one line, nothing runs, the batch goes on.

Covers the loading side of the hardening issue: pickle payloads in every loadable file kind (flow
bundle, preprocessing cache entry, evaluation cache, checkpoints), malformed bundles and bad
checkpoints, FIFOs, devices, decompression bombs and absurd headers with bounded memory, the
size cap, negative-only images, umask-honouring outputs and offline W&B without network lookups.
Tiny files only; the whole module runs in well under a minute.
"""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qcflow.data.discovery import discover_scans
from qcflow.data.nifti import GZIP_SLACK_BYTES, load_nifti, validate_scan
from qcflow.data.preprocess import PreprocessCache, PreprocessConfig
from qcflow.errors import BadFileError, ScanError
from qcflow.testing import head_phantom, nifti_bytes
from qcflow.utils.bundles import content_hash, load_checked, save_checked
from qcflow.utils.io import atomic_dir, atomic_path
from tests.helpers import run_cli


class _Payload:
    """Unpickling this object creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (str(self.marker),))


def _craft(path: Path, marker: Path, wrap: object = None) -> Path:
    """A torch file whose unpickling would run the payload (inside ``wrap``'s dict if given)."""
    obj = {"payload": _Payload(marker)} if wrap is None else {**wrap, "x": _Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


@pytest.fixture(autouse=True)
def _force_unsafe_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with the variable that re-opens unpickling for unspecified call sites."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def _scan(path: Path, data: np.ndarray | None = None, spacing: float = 2.0) -> Path:
    data = head_phantom((24, 26, 22)) if data is None else data
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([spacing] * 3 + [1.0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), mtime=0))
    return path


# ------------------------------------------------------------------------------------------
# 1. no unpickling anywhere
# ------------------------------------------------------------------------------------------


def test_crafted_flow_bundle_is_refused_by_score_cli(tmp_path: Path) -> None:
    """`experiment=score score.flow_run=RUN` with a pickle payload in flow.pt: one line, no run."""
    marker = tmp_path / "pwned"
    run = tmp_path / "flow_run"
    _craft(run / "flow.pt", marker, {"state_dict": {}, "flow_config": {}})
    (run / "codes_train.tsv").write_text("scan_id\tm1\tlog_prob\na\t0\t0\n")
    _scan(tmp_path / "data" / "a_T1w.nii.gz")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "qcflow", "experiment=score", f"data.root={tmp_path / 'data'}",
         f"score.flow_run={run}", "score.uncertainty=false", f"hydra.run.dir={tmp_path / 'out'}"],
        env={**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert not marker.exists(), "the payload ran"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("qcflow: error: ") and str(run / "flow.pt") in lines[0]
    assert "never unpickles" in lines[0]


def test_every_loader_refuses_payloads(tmp_path: Path) -> None:
    """flow.pt, a cache entry, the evaluation cache, encoder and uncertainty checkpoints."""
    from qcflow.lit.uncertainty import UncertaintySeg
    from qcflow.runs.flow import load_encoder, load_flow
    from qcflow.tasks.iqc_evaluate import _VolumeCache
    from qcflow.utils.bundles import load_checkpoint

    marker = tmp_path / "pwned"
    _craft(tmp_path / "run" / "flow.pt", marker)
    with pytest.raises(BadFileError, match="never unpickles"):
        load_flow(tmp_path / "run")
    ckpt = _craft(tmp_path / "enc.ckpt", marker, {"state_dict": {}})
    with pytest.raises(BadFileError, match="encoder checkpoint.*never unpickles"):
        load_encoder(ckpt)
    with pytest.raises(BadFileError, match="never unpickles"):
        load_checkpoint(UncertaintySeg, ckpt, "uncertainty checkpoint")
    # caches: a payload entry is a miss (recomputed), never an error
    entry = _craft(tmp_path / "cache" / "entry.pt", marker)
    assert load_checked(entry, "any-key") is None
    evaluation = _craft(tmp_path / "eval_cache.pt", marker)
    assert _VolumeCache(evaluation).store == {}
    assert not marker.exists(), "a payload ran"


def test_preprocess_cache_entry_is_checked_on_read(tmp_path: Path) -> None:
    """A crafted, edited or renamed cache entry is recomputed; a good one is served."""
    scan = discover_scans(_scan(tmp_path / "data" / "sub-01_T1w.nii.gz"))[0]
    cache = PreprocessCache(tmp_path / "cache", PreprocessConfig(shape=(16, 16, 16)))
    first = cache.load(scan)
    (entry,) = list((tmp_path / "cache").rglob("*.pt"))
    assert torch.equal(cache.load(scan)["image"], first["image"])  # a hit, same content
    assert stat.S_IMODE(entry.stat().st_mode) == 0o666 & ~_umask()
    saved = torch.load(entry, weights_only=True)
    assert isinstance(saved["payload"]["affine"], torch.Tensor)  # no NumPy object pickled

    # an attacker with write access replaces the entry's image but not its hash: a miss
    saved["payload"]["image"] = torch.zeros_like(saved["payload"]["image"])
    torch.save(saved, entry)
    assert torch.equal(cache.load(scan)["image"], first["image"])
    # a payload in the entry: a miss, not run, and the entry is rewritten clean
    marker = tmp_path / "pwned"
    _craft(entry, marker)
    assert torch.equal(cache.load(scan)["image"], first["image"]) and not marker.exists()
    assert load_checked(entry, entry.stem) is not None
    # the same (valid) entry under another key is never served for that key
    assert load_checked(entry, "0" * 40) is None


def test_checked_store_round_trip_and_hash() -> None:
    payload = {"a": torch.arange(6.0).reshape(2, 3), "b": [1, 2.5, "x", None, True]}
    assert content_hash(payload) == content_hash(dict(reversed(list(payload.items()))))
    assert content_hash(payload) != content_hash({**payload, "b": [1, 2.5, "x", None, 1]})
    other = {**payload, "a": payload["a"].double()}
    assert content_hash(payload) != content_hash(other)  # dtype is part of the content
    with pytest.raises(TypeError, match="ndarray"):
        content_hash({"a": np.zeros(2)})


def test_checked_store_survives_reload(tmp_path: Path) -> None:
    payload = {"a": torch.arange(4), "s": "text"}
    save_checked(tmp_path / "e.pt", "k1", payload)
    back = load_checked(tmp_path / "e.pt", "k1")
    assert torch.equal(back["a"], payload["a"]) and back["s"] == "text"
    (tmp_path / "e.pt").write_bytes((tmp_path / "e.pt").read_bytes()[:100])  # truncated
    assert load_checked(tmp_path / "e.pt", "k1") is None
    assert load_checked(tmp_path / "missing.pt", "k1") is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "flow bundle not found"),
        (b"hello, not a torch file", "unreadable flow bundle"),
        ({"state_dict": {}}, "malformed flow bundle (no 'flow_config')"),
        ([1, 2, 3], "malformed flow bundle (a list"),
        (
            {"state_dict": {}, "flow_config": "{not json", "encoder_checkpoint": "e",
             "n_central_slices": 4, "slice_size": 32},
            "'flow_config' is not JSON",
        ),
        (
            {"state_dict": {"w": torch.zeros(1)}, "flow_config": '{"features": 2}',
             "encoder_checkpoint": "e", "n_central_slices": 4, "slice_size": 32},
            "flow does not load",
        ),
    ],
)  # fmt: skip
def test_malformed_flow_bundle_is_one_line(tmp_path: Path, content: object, reason: str) -> None:
    from qcflow.runs.flow import load_flow

    run = tmp_path / "run"
    run.mkdir()
    if isinstance(content, bytes):
        (run / "flow.pt").write_bytes(content)
    elif content is not None:
        torch.save(content, run / "flow.pt")
    with pytest.raises(BadFileError) as info:
        load_flow(run)
    assert reason in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(str(run / "flow.pt"))


def test_bad_encoder_checkpoint_is_one_line(tmp_path: Path) -> None:
    from qcflow.runs.flow import load_encoder

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(os.urandom(2048))
    with pytest.raises(BadFileError, match="unreadable encoder checkpoint") as info:
        load_encoder(bad)
    assert "\n" not in str(info.value)
    torch.save({"state_dict": {}}, bad)  # a torch file, but no hyper-parameters / wrong keys
    with pytest.raises(BadFileError, match="unreadable encoder checkpoint"):
        load_encoder(bad)
    fifo = tmp_path / "fifo.ckpt"
    os.mkfifo(fifo)
    with pytest.raises(BadFileError, match="FIFO"):
        load_encoder(fifo)


# ------------------------------------------------------------------------------------------
# 2. bounded, safe reading
# ------------------------------------------------------------------------------------------


def _header_only(shape: tuple[int, ...], dtype: type, zooms: tuple[float, ...]) -> bytes:
    """A NIfTI-1 header claiming ``shape``/``dtype`` with no voxel data behind it."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_zooms(zooms)
    hdr.set_sform(np.diag([*zooms, 1.0]), code=1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4


def _bomb(path: Path, inflate_to: int) -> Path:
    """A valid small header + data, followed (inside the same gzip stream) by zeros."""
    raw = nifti_bytes(head_phantom((16, 18, 15)), np.diag([2.0, 2.0, 2.0, 1.0]))
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(raw)
        block = b"\0" * (1 << 20)
        for _ in range(inflate_to >> 20):
            gz.write(block)
    return path


def _hostile_files(folder: Path) -> dict[str, str]:
    """``{file name: reason substring}`` for each hostile kind (plus a good scan)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "sub-fifo_T1w.nii.gz")
    os.symlink("/dev/zero", folder / "sub-zero_T1w.nii.gz")
    _bomb(folder / "sub-bomb_T1w.nii.gz", 64 << 20)
    # 1000^3 uint8 at 1 mm in a 1 MB gzip: the field of view gives it away before any read
    big = _header_only((1000, 1000, 1000), np.uint8, (1.0, 1.0, 1.0))
    (folder / "sub-huge_T1w.nii.gz").write_bytes(gzip.compress(big + b"\0" * (1 << 20)))
    # 2048^3 float64 at 0.1 mm (a plausible FOV): 64 GB claimed, refused by the cap
    claim = _header_only((2048, 2048, 2048), np.float64, (0.1, 0.1, 0.1))
    (folder / "sub-claim_T1w.nii").write_bytes(claim)
    _scan(folder / "sub-good_T1w.nii.gz")
    return {
        "sub-fifo_T1w.nii.gz": "not a regular file (a FIFO (named pipe))",
        "sub-zero_T1w.nii.gz": "not a regular file (a character device)",
        "sub-bomb_T1w.nii.gz": "gzip stream inflates past",
        "sub-huge_T1w.nii.gz": "implausible field of view 1000x1000x1000 mm",
        "sub-claim_T1w.nii": "header claims 64.0 GB of data (2048x2048x2048 float64)",
    }


def test_hostile_files_each_get_one_line_quickly(tmp_path: Path) -> None:
    expected = _hostile_files(tmp_path / "in")
    result: dict[str, dict] = {}

    def work() -> None:
        for name in expected:
            result[name] = validate_scan(tmp_path / "in" / name)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), f"hung after {sorted(result)}"
    for name, reason in expected.items():
        row = result[name]
        assert row["status"] == "error" and reason in row["reason"], (name, row["reason"])
        assert "\n" not in row["reason"]
        with pytest.raises(ScanError, match="^" + str(tmp_path / "in" / name)):
            load_nifti(tmp_path / "in" / name)


def test_hostile_inputs_use_less_memory_than_a_valid_scan(tmp_path: Path) -> None:
    """Peak Python/NumPy allocation of each hostile file <= 2x that of one valid scan."""
    expected = _hostile_files(tmp_path / "in")
    expected.pop("sub-fifo_T1w.nii.gz")  # nothing is read at all

    def peak(path: Path) -> int:
        tracemalloc.start()
        try:
            validate_scan(path)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    valid = peak(_scan(tmp_path / "big_T1w.nii.gz", head_phantom((64, 64, 64))))
    for name in expected:
        assert peak(tmp_path / "in" / name) <= 2 * valid, name


def test_validate_cli_goes_on_past_every_hostile_file(tmp_path: Path) -> None:
    import pandas as pd

    expected = _hostile_files(tmp_path / "in")
    proc = run_cli("experiment=validate", f"data.root={tmp_path / 'in'}",
                   f"hydra.run.dir={tmp_path / 'out'}", timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "out" / "validation.tsv", sep="\t", dtype=str).fillna("")
    rows = {Path(p).name: r for p, r in zip(table["path"], table.to_dict("records"), strict=True)}
    assert rows["sub-good_T1w.nii.gz"]["status"] == "ok"
    for name, reason in expected.items():
        assert rows[name]["status"] == "error" and reason in rows[name]["reason"], name
        assert sum(reason in ln for ln in proc.stdout.splitlines()) == 1, name


def test_size_cap_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _scan(tmp_path / "a_T1w.nii.gz", head_phantom((40, 40, 40)))  # 256 KB of float32
    assert validate_scan(path)["status"] == "ok"
    monkeypatch.setenv("QCFLOW_MAX_SCAN_MB", "0.1")
    row = validate_scan(path)
    assert "header claims 0.2 MB of data (40x40x40 float32)" in row["reason"], row["reason"]
    assert "over the scan size limit of 0.1 MB (raise it with data.max_scan_mb" in row["reason"]
    assert validate_scan(path, max_bytes=1 << 20)["status"] == "ok"  # explicit cap wins
    proc = run_cli("experiment=validate", f"data.root={tmp_path}", "data.max_scan_mb=0.1",
                   f"hydra.run.dir={tmp_path / 'out'}", timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "data.max_scan_mb" in proc.stdout, proc.stdout


def test_bomb_limit_is_the_claim_plus_slack(tmp_path: Path) -> None:
    """Trailing bytes within the slack are accepted (CRC still checked); more are refused."""
    ok = _bomb(tmp_path / "ok.nii.gz", 0)
    assert validate_scan(ok)["status"] == "ok"
    raw = nifti_bytes(head_phantom((16, 18, 15)), np.diag([2.0, 2.0, 2.0, 1.0]))
    within = tmp_path / "within.nii.gz"
    within.write_bytes(gzip.compress(raw + b"\0" * (GZIP_SLACK_BYTES // 2), mtime=0))
    assert validate_scan(within)["status"] == "ok"
    past = tmp_path / "past.nii.gz"
    past.write_bytes(gzip.compress(raw + b"\0" * (GZIP_SLACK_BYTES + 10), mtime=0))
    assert "inflates past" in validate_scan(past)["reason"]
    two = tmp_path / "two_members.nii.gz"  # concatenated gzip members are one valid stream
    two.write_bytes(gzip.compress(raw[:1000], mtime=0) + gzip.compress(raw[1000:], mtime=0))
    assert validate_scan(two)["status"] == "ok"
    crc = bytearray(gzip.compress(raw, mtime=0))
    crc[-8] ^= 0xFF  # wrong CRC-32 in the trailer
    (tmp_path / "crc.nii.gz").write_bytes(bytes(crc))
    assert "truncated or corrupt gzip" in validate_scan(tmp_path / "crc.nii.gz")["reason"]


def test_negative_only_image_is_valid_with_a_warning(tmp_path: Path) -> None:
    inverted = _scan(tmp_path / "inv_T1w.nii.gz", -head_phantom((24, 26, 22)) - 1.0)
    row = validate_scan(inverted)
    assert row["status"] == "ok" and "<= 0" in row["warning"]
    assert validate_scan(_scan(tmp_path / "ok_T1w.nii.gz"))["warning"] == ""
    proc = run_cli("experiment=validate", f"data.root={tmp_path}",
                   f"hydra.run.dir={tmp_path / 'out'}", timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "1 with a warning" in proc.stdout, proc.stdout
    assert "inv_T1w: warning: every intensity is <= 0" in proc.stdout


# ------------------------------------------------------------------------------------------
# 5. small things: umask, W&B offline
# ------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_honour_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        with atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask


_NO_LOOKUP = """
import sys, threading
log = open(sys.argv[1], "a", buffering=1)
def spy(frame, event, arg):
    if event == "c_call" and getattr(arg, "__name__", "") in (
            "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        log.write(arg.__name__ + "\\n")
threading.setprofile(spy)
sys.setprofile(spy)
from qcflow.utils.wandb import wandb_mode
mode = wandb_mode()  # what the logger config's resolver does
import wandb
run = wandb.init(mode=mode, project="qcflow-test", dir=sys.argv[2])
run.log({"a": 1.0})
run.finish()
"""


def test_offline_wandb_makes_no_network_lookup(tmp_path: Path) -> None:
    """Measured: without WANDB_MODE=offline in the environment, W&B's telemetry exporter looks
    up api.forge.coreweave.com at exit (one getaddrinfo); qcflow's offline mode prevents it."""
    pytest.importorskip("wandb")
    lookups = tmp_path / "lookups.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"WANDB_SILENT": "true", "NETRC": str(tmp_path / "no_netrc"), "OMP_NUM_THREADS": "1"}
    env |= {"WANDB_CONFIG_DIR": str(tmp_path / "cfg"), "WANDB_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_LOOKUP, str(lookups), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline run was written"
    assert not lookups.exists() or lookups.read_text() == "", lookups.read_text()
