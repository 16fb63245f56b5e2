"""The training recipe (l2sm_kernels.train): its schedule, backbones and data, the checkpoint's re-split of
the head, and the command end to end: 2 gloo ranks under torchrun (exits cleanly, writes its checkpoint,
summary and verification numbers), then resumed at world size 1 (one process, no torchrun) and 3 with
the same loss on a fixed batch. Tiny sizes: these runs are about the process plumbing, not learning."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2sm_kernels.train import lr_at, main
from l2sm_kernels.train.backbone import build_backbone
from l2sm_kernels.train.checkpoint import _reshard_optimizer
from l2sm_kernels.train.data import SyntheticFaces, synthetic_verification_set

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--classes", "13", "--per-class", "6", "--batch-size", "4", "--image-size", "16", "--log-every", "1",
        "--val-synthetic", "20", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_lr_schedule_is_linear_warmup_then_polynomial_decay():
    assert [lr_at(s, 1.0, 4, 10, 1.0) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_at(7, 1.0, 4, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(7, 1.0, 4, 10, 2.0) == pytest.approx(0.25)
    assert lr_at(10, 1.0, 4, 10, 1.0) == 0.0 and lr_at(12, 1.0, 4, 10, 1.0) == 0.0
    assert lr_at(1, 0.1, 0, 2, 1.0) == pytest.approx(0.05)


def test_backbones_map_images_to_embeddings():
    x = torch.randn(2, 3, 16, 16)
    assert build_backbone("iresnet-tiny", 24, 16)(x).shape == (2, 24)
    net = build_backbone("torch.nn:Identity", 24, 16)  # "package.module:callable"... called with num_features
    assert isinstance(net, torch.nn.Identity)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("nope", 24, 16)
    with pytest.raises(ValueError, match="divisible"):
        build_backbone("iresnet-tiny", 24, 20)


def test_synthetic_data_is_deterministic_and_held_out_classes_are_new():
    a, b = SyntheticFaces(5, 3, 16, seed=1), SyntheticFaces(8, 3, 16, seed=1)
    assert len(a) == 15 and a[4][1] == 1
    assert torch.equal(a[4][0], b[4][0]) and a[4][0].dtype == torch.uint8 and a[4][0].shape == (3, 16, 16)
    assert not torch.equal(a[3][0], a[4][0])
    vs = synthetic_verification_set(10, 16, seed=1, first_class=5)
    assert vs.images.shape == (20, 3, 16, 16) and vs.issame.tolist() == [True, False] * 5


def test_reshard_optimizer_state_concatenates_and_slices_rows():
    g = torch.Generator().manual_seed(0)
    m0, m1 = torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g)
    old = [{"state": {0: {"momentum_buffer": m0, "step": torch.tensor(7.0)}}, "param_groups": []},
           {"state": {0: {"momentum_buffer": m1, "step": torch.tensor(7.0)}}, "param_groups": []}]
    mine = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    out = _reshard_optimizer(old, mine, [3, 2], 1, 4)
    assert torch.equal(out["state"][0]["momentum_buffer"], torch.cat([m0, m1])[1:4])
    assert float(out["state"][0]["step"]) == 7.0 and out["param_groups"] == mine["param_groups"]
    old[1]["state"] = {}  # a rank that never stepped: the state starts afresh
    assert _reshard_optimizer(old, mine, [3, 2], 1, 4)["state"] == {}


def _torchrun(nproc, args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "l2sm_kernels.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train2")
    r = _torchrun(2, ["--output", str(out), "--steps", "3", *TINY])
    return out, r


def test_two_gloo_ranks_end_to_end_exit_cleanly(two_rank_run):
    out, r = two_rank_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == 3 and s["world_size"] == 2 and [st for st, _ in s["losses"]] == [1, 2, 3]
    assert all(math.isfinite(v) for _, v in s["losses"])
    v = s["verification"]["synthetic_heldout"]
    assert 0 <= v["accuracy"] <= 1 and v["xnorm"] > 0
    for f in ("checkpoint/checkpoint_rank0.pt", "checkpoint/checkpoint_rank1.pt", "checkpoint/checkpoint_done.pt",
              "model.pt", "training.log"):
        assert (out / f).exists(), f
    assert "[synthetic_heldout][3] XNorm" in (out / "training.log").read_text()


def _copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_resume_at_world_size_1_and_3_gives_the_same_loss(two_rank_run, tmp_path):
    out, r = two_rank_run
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((out / "summary.json").read_text())["probe_loss_saved"]
    # world size 1: one process, no torchrun
    one = _copy_run(out, tmp_path / "w1")
    s1 = main(["--output", str(one), "--steps", "4", "--resume", *TINY])
    assert s1["resumed_from"]["world_size"] == 2 and s1["resumed_from"]["step"] == 3 and s1["step"] == 4
    # the same weights give the same loss on the fixed batch; only the order of the sums differs
    assert s1["probe_loss_resumed"] == pytest.approx(saved, rel=1e-5)
    three = _copy_run(out, tmp_path / "w3")
    # (and goes on in fp16: the scaler of several ranks, which must agree on overflow, in a real run)
    r3 = _torchrun(3, ["--output", str(three), "--steps", "4", "--resume", *TINY, "--amp", "fp16"])
    assert r3.returncode == 0, r3.stdout[-3000:] + r3.stderr[-3000:]
    s3 = json.loads((three / "summary.json").read_text())
    assert s3["world_size"] == 3 and s3["step"] == 4 and all(math.isfinite(v) for _, v in s3["losses"])
    assert s3["probe_loss_resumed"] == pytest.approx(saved, rel=1e-5)
    # a resumed run that trains on writes a new checkpoint at its own world size
    assert torch.load(three / "checkpoint" / "checkpoint_done.pt", weights_only=True)["world_size"] == 3


def test_two_ranks_take_the_single_process_step(tmp_path):
    """A batch-norm-free backbone: one step of 2 ranks x 4 images is the step of 1 process x 8 images (the
    same global batch, flips drawn per image): the head's loss is the global batch's on every rank and DDP
    sums the ranks' gradients, so backbone and head get the single-process update."""
    # step 2 runs at lr 0 (the end of the decay): one update; no clip (it would hide a gradient of the wrong size)
    args = ["--backbone", "mlp", "--steps", "2", "--warmup-steps", "0", "--clip", "0", "--val-synthetic", "0",
            "--probe-batch", "0", "--classes", "13", "--per-class", "6", "--image-size", "16", "--log-every", "1",
            "--no-progress", "--threads", "1"]
    r = _torchrun(2, ["--output", str(tmp_path / "w2"), "--batch-size", "4", *args])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s1 = main(["--output", str(tmp_path / "w1"), "--batch-size", "8", *args])
    s2 = json.loads((tmp_path / "w2" / "summary.json").read_text())
    assert s2["losses"][0][1] == pytest.approx(s1["losses"][0][1], rel=1e-5)
    b1, b2 = (torch.load(tmp_path / w / "model.pt", weights_only=True) for w in ("w1", "w2"))
    torch.manual_seed(0)  # the loop's initialization: seed 0, then the backbone
    init = build_backbone("mlp", 128, 16).state_dict()
    for k in b1:
        torch.testing.assert_close(b2[k], b1[k], rtol=1e-4, atol=1e-6)
        assert (b1[k] - init[k]).abs().max() > 1e-3, k  # a real step, far above the tolerance
    h1 = torch.load(tmp_path / "w1" / "checkpoint" / "checkpoint_rank0.pt", weights_only=True)["head"]["weight"]
    h2 = torch.cat([torch.load(tmp_path / "w2" / "checkpoint" / f"checkpoint_rank{r}.pt", weights_only=True)
                    ["head"]["weight"] for r in (0, 1)])
    torch.testing.assert_close(h2, h1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_single_process_mixed_precision_and_accumulation(tmp_path, amp):
    s = main(["--output", str(tmp_path), "--steps", "2", "--accum", "2", "--amp", amp, "--optimizer", "adamw",
              *TINY, "--val-synthetic", "0"])  # the last value of an option wins
    assert s["step"] == 2 and s["world_size"] == 1 and all(math.isfinite(v) for _, v in s["losses"])
    ck = torch.load(tmp_path / "checkpoint" / "checkpoint_rank0.pt", weights_only=True)
    assert ck["step"] == 2 and ck["head"]["weight"].shape == (13, 128) and ck["head"]["weight"].dtype == torch.float32
    assert (ck["scaler"] is not None) == (amp == "fp16")


def test_image_folder_data_and_a_cosface_partial_fc_run(tmp_path):
    from PIL import Image

    from l2sm_kernels.train.data import ImageFolder
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["alice", "bob", "carol"]):
        (tmp_path / "faces" / name).mkdir(parents=True)
        for k in range(4):
            img = torch.randint(0, 256, (20, 18, 3), generator=g, dtype=torch.uint8).numpy()  # resized to 16 x 16
            Image.fromarray(img).save(tmp_path / "faces" / name / f"{k}.png")
    (tmp_path / "faces" / "bob" / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(tmp_path / "faces"), image_size=16)
    assert ds.classes == ["alice", "bob", "carol"] and len(ds) == 12 and ds.num_classes == 3
    x, y = ds[5]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 1
    s = main(["--data", str(tmp_path / "faces"), "--output", str(tmp_path / "run"), "--steps", "2", *TINY,
              "--batch-size", "3", "--margin-type", "cosface", "--sample-rate", "0.5"])
    assert s["step"] == 2 and all(math.isfinite(v) for _, v in s["losses"])
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(str(tmp_path / "faces" / "alice"))
