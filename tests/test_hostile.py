"""hw3_1.sh / hw3_2.sh and atomic outputs under hostile use (issue 23, points 4, 5 and 7):

- the output may not name the image encoder hw3_2 loads (the released CLIP file, timm weights,
  a hub cache entry) nor hw3_1's CLIP (clip.load's cache file of a CLIP name);
- a file name that is not valid UTF-8 costs hw3_2 that image alone (exit 3, one line), not
  every caption;
- an output under /proc or /sys, or a device or pipe, is refused before anything loads, naming
  the output (not a temporary file); so are two images of one name (a.jpg, a.png);
- a killed writer's temporary file cannot pass for an output and goes at the next write.

The world is tiny and untrained (a 1-layer CLIP, a 2-layer GPT-2, a captioner straight from its
initialisation): these tests are about what is written and refused, not about the captions.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.atomic import atomic_dir, atomic_path, check_writable, write_json

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
ODD = os.fsdecode(b"caf\xe9.png")   # a Latin-1 file name: not valid UTF-8


def make_world(root):
    """root/: clip.pt (tiny CLIP), decoder.bin (tiny GPT-2 in the course's format), release/ (an
    untrained gated_cross + LoRA captioner for them, greedy decoding), params.yaml (zero-shot with
    clip.pt), id2label.json and images/ (three PNGs)."""
    from captioning.bridges import BridgeConfig
    from captioning.captioner import Captioner, CaptionerConfig
    from captioning.checkpoint import save_trainable
    from captioning.gpt2 import GPT2, GPT2Config, course_state_dict, weights_id
    from captioning.peft import PeftConfig
    from captioning.tokenizer import Tokenizer
    from evaluation.encoders import EncoderConfig, encoder_id
    from tests.test_handin import byte_level_vocab
    from tests.tiny_world import tiny_clip

    release = root / "release"
    release.mkdir(parents=True)
    tiny_clip(root / "clip.pt")   # 32 x 32 images, 8 x 8 patches: 17 tokens of width 64
    byte_level_vocab(release)
    tokenizer = Tokenizer.from_files(release / "encoder.json", release / "vocab.bpe")
    torch.manual_seed(0)
    decoder = GPT2(GPT2Config(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2,
                              n_embd=32))
    torch.save(course_state_dict(decoder), root / "decoder.bin")
    config = CaptionerConfig(
        decoder=decoder.config, visual_width=64, visual_tokens=17,
        bridge=BridgeConfig.of("gated_cross", layers="all"), peft=PeftConfig.of("lora", rank=2),
        encoder_id=encoder_id(EncoderConfig(kind="clip", name=str(root / "clip.pt"))),
        tokenizer_id=tokenizer.identity, decoder_id=weights_id(decoder))
    save_trainable(Captioner(config, decoder), release / "captioner.safetensors")
    (release / "selected.json").write_text(json.dumps(
        {"variant": "lora", "scores": {"cider": 0.0}, "encoder": {"kind": "clip", "name": str(root / "clip.pt")},
         "decode": {"method": "greedy", "max_new_tokens": 4, "batch_size": 2}, "decoder_heads": 2}))
    (root / "params.yaml").write_text(json.dumps({"zeroshot": {"clip": str(root / "clip.pt"),
                                                               "device": "cpu"}}))
    (root / "id2label.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    images = root / "images"
    images.mkdir()
    for i, name in enumerate(["0_1.png", "1_2.jpg", "0_3.png"]):
        Image.new("RGB", (40, 30), (80 * i, 100, 200)).save(images / name)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("hostile"))


def hw3_2(world, images, out, *extra, release=None):
    from stages import hw3_2 as script
    return script.main([str(images), str(out), str(world / "decoder.bin"),
                        "--release", str(release or world / "release"), *extra])


def hw3_1(world, images, out, *extra):
    from stages import hw3_1 as script
    return script.main([str(images), str(world / "id2label.json"), str(out),
                        "--params", str(world / "params.yaml"), *extra])


def release_with_encoder(world, tmp_path, encoder):
    """A copy of the world's release whose selected.json names `encoder`."""
    release = tmp_path / "release"
    release.mkdir()
    for p in (world / "release").iterdir():
        (release / p.name).write_bytes(p.read_bytes())
    selected = json.loads((release / "selected.json").read_text())
    selected["encoder"] = encoder
    (release / "selected.json").write_text(json.dumps(selected))
    return release


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the release fails the test: what is refused must be refused before it."""
    import inference.release

    def load_release(*args, **kwargs):
        raise AssertionError("the release was loaded before the refusal")
    monkeypatch.setattr(inference.release, "load_release", load_release)


# ------------------------------------------------------------- 4: the encoder is an input too

def test_hw3_2_never_writes_over_the_released_clip(world, tmp_path, capsys):
    """The issue's case: OUT_JSON naming the CLIP that selected.json names. It exited 0 and
    replaced the CLIP with JSON; the next run failed."""
    clip_file = world / "clip.pt"
    before = clip_file.read_bytes()
    assert hw3_2(world, world / "images", clip_file) == 1
    err = capsys.readouterr().err
    assert f"{clip_file}: is an input" in err and "Traceback" not in err
    assert clip_file.read_bytes() == before
    assert hw3_2(world, world / "images", tmp_path / "pred.json") == 0   # it still works


def test_hw3_2_never_writes_over_timm_weights(world, tmp_path, capsys, no_loading):
    weights = tmp_path / "vit.safetensors"
    weights.write_bytes(b"weights")
    release = release_with_encoder(world, tmp_path, {"kind": "timm", "name": "vit_tiny_patch16_224",
                                                     "weights": str(weights)})
    assert hw3_2(world, world / "images", weights, release=release) == 1
    assert f"{weights}: is an input" in capsys.readouterr().err
    assert weights.read_bytes() == b"weights"


def fake_hub_cache(hub, repo, filename, data=b"cached weights"):
    """A huggingface_hub cache holding one file of `repo`, as hf_hub_download leaves it: a
    snapshot entry that is a symlink into blobs/."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "blobs").mkdir()
    (folder / "snapshots/0123abcd").mkdir(parents=True)
    (folder / "refs/main").write_text("0123abcd")
    (folder / "blobs/feedbeef").write_bytes(data)
    entry = folder / "snapshots/0123abcd" / filename
    entry.symlink_to(Path("../../blobs/feedbeef"))
    return entry


def test_hw3_2_never_writes_over_the_hub_cache_of_a_named_timm_model(world, tmp_path, capsys,
                                                                      monkeypatch, no_loading):
    """A timm model without `weights` loads from the hub cache: neither the snapshot entry (a
    symlink: writing there would replace it) nor the blob behind it may be the output."""
    import huggingface_hub.constants
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    entry = fake_hub_cache(hub, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model.safetensors")
    release = release_with_encoder(world, tmp_path, {"kind": "timm", "name": "vit_tiny_patch16_224"})
    for out in (entry, entry.resolve()):
        assert hw3_2(world, world / "images", out, release=release) == 1
        assert "is an input" in capsys.readouterr().err
        assert entry.is_symlink() and entry.read_bytes() == b"cached weights"


def test_hw3_1_never_writes_over_the_cache_file_of_a_named_clip(world, tmp_path, capsys, monkeypatch):
    """zeroshot.clip: ViT-B/32 is clip.load's ~/.cache/clip/ViT-B-32.pt."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cached = tmp_path / ".cache/clip/ViT-B-32.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"openai's archive")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"zeroshot": {"clip": "ViT-B/32", "device": "cpu"}}))
    from stages import hw3_1 as script
    assert script.main([str(world / "images"), str(world / "id2label.json"), str(cached),
                        "--params", str(params)]) == 1
    assert f"{cached}: is an input" in capsys.readouterr().err
    assert cached.read_bytes() == b"openai's archive"


def test_model_files_name_what_loading_reads(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from evaluation.encoders import EncoderConfig
    from inference.model_files import clip_files, encoder_files, timm_files
    monkeypatch.setenv("HOME", str(tmp_path))
    assert clip_files("ViT-B/32") == []   # not cached: nothing to lose
    (tmp_path / ".cache/clip").mkdir(parents=True)
    (tmp_path / ".cache/clip/ViT-B-32.pt").write_bytes(b"x")
    assert clip_files("ViT-B/32") == [tmp_path / ".cache/clip/ViT-B-32.pt"]
    assert clip_files("no such model") == [] and clip_files(tmp_path) == [tmp_path]
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    entry = fake_hub_cache(hub, "timm/vit_base_patch16_clip_224.openai", "open_clip_pytorch_model.bin")
    for name in ("vit_base_patch16_clip_224.openai", "hf-hub:timm/vit_base_patch16_clip_224.openai"):
        assert timm_files(name) == [entry]
    assert timm_files("vit_tiny_patch16_224") == [] and timm_files("not_a_timm_model") == []
    weights = tmp_path / "w.pth"
    assert encoder_files(EncoderConfig(kind="timm", name="vit_tiny_patch16_224",
                                       weights=str(weights))) == [weights]


# ---------------------------------------------------------- 5: a file name that is not UTF-8

def test_hw3_2_leaves_out_a_name_that_is_not_utf8_and_writes_the_others(world, tmp_path, capfd):
    """It captioned everything, then failed to write the JSON (exit 1, every caption lost,
    naming no file). A JSON key must be UTF-8: that image is skipped with one line naming it."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(images / "ok.png")
    Image.new("RGB", (40, 30), (200, 10, 30)).save(images / ODD)
    out = tmp_path / "pred.json"
    assert hw3_2(world, images, out) == 3
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "caf\\xe9.png" in line]
    assert len(lines) == 1 and "not valid UTF-8" in lines[0], err
    assert list(json.loads(out.read_text(encoding="utf-8"))) == ["ok"]

    only_odd = tmp_path / "only"
    only_odd.mkdir()
    (images / ODD).rename(only_odd / ODD)
    assert hw3_2(world, only_odd, tmp_path / "none.json") == 1
    assert "valid UTF-8" in capfd.readouterr().err and not (tmp_path / "none.json").exists()


def test_ctrl_c_is_one_line_and_exit_130_with_the_previous_output_intact(world, tmp_path, capfd,
                                                                        monkeypatch):
    import inference.caption_folder
    from stages import hw3_1 as script_1
    out = tmp_path / "pred.json"
    out.write_text('{"previous": "run"}')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(inference.caption_folder, "caption_folder", interrupted)   # mid-captioning
    assert hw3_2(world, world / "images", out) == 130
    monkeypatch.setattr(script_1, "run", interrupted)
    assert hw3_1(world, world / "images", tmp_path / "pred.csv") == 130
    err = capfd.readouterr().err
    assert err.splitlines()[-2:] == ["hw3_2: interrupted: nothing written",
                                     "hw3_1: interrupted: nothing written"], err
    assert out.read_text() == '{"previous": "run"}' and sorted(os.listdir(tmp_path)) == ["pred.json"]


def test_image_names_refuse_a_name_that_is_not_utf8(tmp_path):
    """The feature file (HDF5 utf-8 strings) cannot hold it either: extract stops at once,
    naming the file, instead of failing at the end of the encoding."""
    from common.imageio import ImageFolderError, image_names
    with pytest.raises(ImageFolderError, match=r"caf\\xe9\.png: file name is not valid UTF-8"):
        image_names([tmp_path / "ok.png", tmp_path / ODD])


# --------------------------------------------------------------------------- 7: the rest

@pytest.mark.parametrize("out", ["/proc/hw3_out.json", "/proc/no/such/folder/out.json",
                                 "/sys/hw3_out.json", "/sys/kernel/out.json"])
def test_an_output_under_proc_or_sys_is_refused_before_loading(world, out, capsys, no_loading):
    """It failed after the whole run, naming a temporary file (as root, os.access says yes)."""
    assert hw3_2(world, world / "images", out) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hw3_2: error: {out}: output path is in /") and ".tmp-" not in err, err


def test_a_folder_where_no_file_can_be_created_is_refused_naming_the_output(tmp_path, monkeypatch):
    """A read-only mount (or, for a user, a read-only folder) passes os.access for root: the
    check creates a file there once. Here mkstemp fails as it does on a read-only mount."""
    import common.atomic

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".tmp-x"))
    monkeypatch.setattr(common.atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(ValueError) as e:
        check_writable(tmp_path / "sub" / "out.json")
    assert str(e.value) == (f"{tmp_path / 'sub' / 'out.json'}: cannot be written ({tmp_path} is "
                            "not a writable folder: Read-only file system)")


def test_a_device_or_pipe_is_never_replaced(world, tmp_path, capsys, no_loading):
    """The output is renamed onto its path: as root, /dev/full or /dev/null would become a JSON
    file, and so would /dev/stdout when stdout is a file (a link to it, through /proc). A
    device, a pipe or any path in /dev (but /dev/shm) is refused."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert hw3_2(world, world / "images", fifo) == 1
    assert f"{fifo}: output path is a named pipe, not a file" in capsys.readouterr().err
    assert fifo.is_fifo()
    for device in ("/dev/null", "/dev/full"):
        if os.path.exists(device):
            with pytest.raises(ValueError, match=f"{device}: output path is a character device"):
                check_writable(device)
    with open(tmp_path / "stdout.txt", "w") as f:   # `hw3_2.sh ... /dev/stdout > file`
        result = subprocess.run([sys.executable, "-c", "from common.atomic import check_writable; "
                                 "check_writable('/dev/stdout')"], cwd=REPO, env=ENV, stdout=f,
                                stderr=subprocess.PIPE, text=True)
    assert "/dev/stdout: output path is in /dev" in result.stderr
    for ok in ("/dev/shm/hw3_out.json",):
        if os.path.isdir("/dev/shm"):
            check_writable(ok)


def test_two_images_of_one_name_are_fatal_before_loading(world, tmp_path, capsys, no_loading):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(images / name)
    out = tmp_path / "pred.json"
    assert hw3_2(world, images, out) == 1
    assert "two images share the name 'a'" in capsys.readouterr().err and not out.exists()


def test_write_errors_name_the_output_not_its_temporary_file(tmp_path):
    out = tmp_path / "pred.json"
    with pytest.raises(OSError) as e:
        with atomic_path(out):
            raise OSError(errno.ENOSPC, "No space left on device")   # a full disk, mid-write
    assert str(out) in str(e.value) and ".tmp-" not in str(e.value)
    with pytest.raises(OSError) as e:
        with atomic_path(out) as tmp:   # h5py's way: the file name inside its own message
            raise OSError(f"Unable to create file (unable to open file: name = '{tmp}', errno = 28)")
    assert str(out) in str(e.value) and ".tmp-" not in str(e.value)
    assert not out.exists() and not list(tmp_path.iterdir())


KILLED_WRITER = """
import os, signal, sys
from common.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a feature file")
    open(sys.argv[2], "w").close()
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    signal.pause()
"""


def start_writer(target, ready, how):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), str(ready), how],
                            cwd=REPO, env=ENV)
    for _ in range(300):
        if ready.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    return proc


def test_a_killed_writers_leftover_is_unmistakable_and_goes_at_the_next_write(tmp_path):
    """A killed extract leaves its temporary file; DVC's run-cache checkout then restores the
    outputs without running any code. The leftover cannot pass for an output (hidden, `.partial`,
    not `.h5`), and the next write into that folder removes it, while a live writer's stays."""
    features = tmp_path / "features"
    proc = start_writer(features / "train.h5", tmp_path / "ready1", "kill")
    assert proc.wait() == -signal.SIGKILL
    [leftover] = features.iterdir()
    assert leftover.name.startswith(".tmp-train.h5-") and leftover.name.endswith(".partial")
    assert not list(features.glob("*.h5"))

    (features / "train.h5").write_bytes(b"restored by dvc")   # the run-cache checkout
    live = start_writer(features / "p3.h5", tmp_path / "ready2", "wait")
    try:
        write_json(features / "val.json", {})   # any later write in that folder
        names = sorted(p.name for p in features.iterdir())
        assert [n for n in names if n.startswith(".tmp-")] == \
            [n for n in names if n.startswith(".tmp-p3.h5-")] and len(names) == 3, names
    finally:
        live.kill()
        live.wait()
    with atomic_dir(features / "sub") as tmp:   # a folder output cleans up the same way
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in features.iterdir()) == ["sub", "train.h5", "val.json"]


def test_a_params_file_that_is_not_yaml_is_one_line(world, tmp_path, capsys):
    """A YAML parser's message spans five lines (with a caret): the scripts print one."""
    params = tmp_path / "params.yaml"
    params.write_text("zeroshot: {clip: x\n")
    assert hw3_1(world, world / "images", tmp_path / "p1.csv", "--params", str(params)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hw3_1: error: {params}: not valid YAML") and err.count("\n") == 1, err
    assert not (tmp_path / "p1.csv").exists()


def test_an_output_with_a_long_name_can_be_written(tmp_path):
    """A file system takes 255 bytes a name: the temporary name (prefix, pid, random part,
    suffix) must fit beside an output name that does."""
    out = tmp_path / ("x" * 250 + ".json")
    check_writable(out)
    write_json(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == [out.name]
