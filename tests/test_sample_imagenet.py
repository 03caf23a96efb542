"""Mass sampling: deterministic per batch, resumable, independent of sharding, packed into an ADM-style npz."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

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
