"""Mass sampling: deterministic per batch, resumable, independent of sharding, packed into an ADM-style npz."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
import sample_imagenet  # noqa: E402


def test_sample_resume_and_npz(tmp_path):
    args = ["--output_dir", str(tmp_path / "run"), "--num_per_class", "3", "--classes", "1", "4", "7", "--batch_size", "4", "--seed", "5"]
    first = sample_imagenet.main(args)
    assert first == {**first, "images": 9, "made": 9}
    packed = np.load(tmp_path / "run" / "samples.npz")
    assert packed["arr_0"].shape == (9, 32, 32, 3) and packed["arr_0"].dtype == np.uint8
    assert packed["arr_1"].tolist() == [1, 1, 1, 4, 4, 4, 7, 7, 7]

    # an interrupted run: the batch holding image 5 is lost and is redrawn identically, nothing else is redone
    (tmp_path / "run" / "images" / "000005.png").unlink()
    again = sample_imagenet.main(args)
    assert again["made"] == 4
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "samples.npz")["arr_0"], packed["arr_0"])

    # other settings in the same folder are refused
    try:
        sample_imagenet.main(args[:-1] + ["6"])
    except SystemExit as error:
        assert "other settings" in str(error)
    else:
        raise AssertionError("a folder with other settings must be refused")


def test_two_processes_give_the_same_samples(tmp_path):
    """Batches are seeded by their number only: sharding over 2 processes changes nothing."""
    import os
    import subprocess

    args = ["--num_per_class", "2", "--classes", "0", "3", "9", "--batch_size", "2", "--seed", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes: thread count changes float reduction order
    try:
        sample_imagenet.main(["--output_dir", str(tmp_path / "one"), *args])
    finally:
        torch.set_num_threads(threads)
    script = Path(sample_imagenet.__file__)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(30500 + os.getpid() % 1000),
               str(script), "--output_dir", str(tmp_path / "two"), *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "samples.npz")["arr_0"], np.load(tmp_path / "one" / "samples.npz")["arr_0"])


def test_a_failed_png_write_stops_the_run_and_a_rerun_completes_it(tmp_path, monkeypatch):
    """PNGs are written by worker threads: their errors must reach the caller, not vanish with the thread."""
    args = ["--output_dir", str(tmp_path / "run"), "--num_per_class", "2", "--classes", "2", "5", "--batch_size", "1", "--seed", "3"]
    real_save = sample_imagenet.save_png

    def save_failing_once(image, path):
        if path.name == "000002.png":
            raise OSError("No space left on device")
        real_save(image, path)

    monkeypatch.setattr(sample_imagenet, "save_png", save_failing_once)
    try:
        sample_imagenet.main(args)
    except OSError as error:
        assert "No space left" in str(error)
    else:
        raise AssertionError("the failed write must stop the run")
    assert not (tmp_path / "run" / "images" / "000002.png").exists()
    monkeypatch.setattr(sample_imagenet, "save_png", real_save)
    rerun = sample_imagenet.main(args)
    assert 1 <= rerun["made"] < 4  # only what was not written is sampled again
    assert np.load(tmp_path / "run" / "samples.npz")["arr_0"].shape == (4, 32, 32, 3)
